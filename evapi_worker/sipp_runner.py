"""Run one SIPp process per fake call, and always reap it.

SIPp is started with an argument list (never a shell), in its own session
so that a timeout or shutdown kills it and anything it started with one
``killpg``. Its injection CSV lives in a private temporary folder that is
removed after the run. The scenario logs one ``outcome=NAME`` line to its
``-log_file``; the exit code is the fallback when it could not.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Final, Literal

import msgspec
import trio

from .sip_values import bracketed

__all__ = [
    "Outcome",
    "RunResult",
    "SippJob",
    "SippRunner",
    "SippSettings",
    "bind_error",
    "bundled_scenario",
    "free_port",
    "remove_stale_folders",
]

# A run's private folder (its CSV holds the pin key) is named after the
# worker's process id, so that folders a killed worker left behind can be
# told from those of workers still running on the same host.
_FOLDER_PREFIX: Final = "evapi-worker-sipp-"

log = logging.getLogger("evapi_worker.sipp")


def bundled_scenario() -> Path:
    """Path of the scenario shipped inside the package."""
    return Path(str(resources.files("evapi_worker") / "sipp" / "late_call.xml"))


class Outcome(enum.Enum):
    """How one fake call ended (a metric label)."""

    COMPLETED = "completed"  # the device rang and took the CANCEL
    ANSWERED = "answered"  # the device answered; ACK and BYE were sent
    REJECTED = "rejected"  # the device refused the INVITE
    UNREACHABLE = "unreachable"  # the device's TCP/TLS connection was gone (Kamailio's 477)
    TIMEOUT = "timeout"  # no ringing in time; cancelled after Kamailio's 100
    NO_RESPONSE = "no_response"  # nothing came back at all
    GAVE_UP = "gave_up"  # no final response to the CANCEL in time
    KILLED = "killed"  # SIPp was killed: past its time limit, or the worker stopped
    DEFERRED = "deferred"  # not begun when the worker stopped: saved, begun after its restart
    OVERDUE = "overdue"  # dropped: its deadline passed while it waited
    TAKEN = "taken"  # another worker claimed this fake call and sends it
    UNSAFE = "unsafe"  # refused: event data not safe for SIP or CSV
    FAILED = "failed"  # SIPp or the command to Kamailio failed


# The outcomes the scenario itself logs.
_LOGGED: Final = {
    o.value: o
    for o in (
        Outcome.COMPLETED,
        Outcome.ANSWERED,
        Outcome.REJECTED,
        Outcome.UNREACHABLE,
        Outcome.TIMEOUT,
        Outcome.NO_RESPONSE,
        Outcome.GAVE_UP,
    )
}
# SIPp's documented exit codes (sipp(1)): anything but 0 is a failure.
_EXIT_MEANING: Final = {
    0: "all calls succeeded",
    1: "a call failed",
    97: "exit on internal command",
    99: "no call processed",
    255: "fatal error",
    254: "fatal error binding a socket",
}


class SippSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How fake calls run, and the ``[sipp]`` table of the settings file."""

    binary: Annotated[str, msgspec.Meta(min_length=1)] = "sipp"
    scenario: Path | None = None  # None: the bundled late_call.xml
    max_concurrent: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 8
    timeout: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0
    local_ip: Annotated[str, msgspec.Meta(min_length=1)] = "127.0.0.1"
    port_base: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0  # 0: a free port the system picks for each run
    transport: Literal["udp", "tcp"] = "udp"  # from SIPp to Kamailio

    def __post_init__(self) -> None:
        if self.port_base and self.port_base + self.max_concurrent > 65536:
            raise ValueError("port_base: leaves no room for max_concurrent ports")


@dataclass(frozen=True, slots=True)
class SippJob:
    """Everything one run needs; all values already checked by sip_values."""

    call_id_format: str  # the Call-ID, '%' escaped for -cid_str
    csv_line: str
    remote_host: str
    remote_port: int


@dataclass(frozen=True, slots=True)
class RunResult:
    outcome: Outcome
    returncode: int | None
    duration: float
    detail: str = ""


class SippRunner:
    """Runs :class:`SippJob` s with at most ``max_concurrent`` at once."""

    def __init__(self, settings: SippSettings) -> None:
        self.settings = settings
        self.scenario = settings.scenario or bundled_scenario()
        self.limiter = trio.CapacityLimiter(settings.max_concurrent)
        self._free_ports = (
            [settings.port_base + i for i in range(settings.max_concurrent)] if settings.port_base else []
        )

    @property
    def running(self) -> int:
        return self.limiter.borrowed_tokens

    @property
    def waiting(self) -> int:
        return self.limiter.statistics().tasks_waiting

    async def run(self, job: SippJob) -> RunResult:
        """Run one job; the caller holds a token of :attr:`limiter`."""
        started = trio.current_time()
        pooled = bool(self._free_ports)
        port = self._free_ports.pop() if pooled else self._ephemeral_port()
        try:
            with tempfile.TemporaryDirectory(prefix=f"{_FOLDER_PREFIX}{os.getpid()}-") as tmp:
                return await self._run_in(Path(tmp), job, port, started)
        except OSError as exc:
            # No folder, no descriptors, a full disk: this run's outcome,
            # never the service's end.
            return RunResult(Outcome.FAILED, None, trio.current_time() - started, f"cannot prepare SIPp: {exc}")
        finally:
            if pooled:
                self._free_ports.append(port)

    def _ephemeral_port(self) -> int:
        """A free port for the next run. Left to itself SIPp tries 5060,
        5061 and up, next to Kamailio's own ports."""
        kind = socket.SOCK_DGRAM if self.settings.transport == "udp" else socket.SOCK_STREAM
        try:
            return free_port(self.settings.local_ip, kind)
        except OSError:
            return 0  # let SIPp pick; the run will say if it cannot bind

    def command(self, job: SippJob, folder: Path, port: int) -> list[str]:
        s = self.settings
        args = [
            s.binary,
            f"{bracketed(job.remote_host)}:{job.remote_port}",
            "-sf", str(self.scenario),
            "-inf", str(folder / "call.csv"),
            "-cid_str", job.call_id_format,
            "-m", "1",
            # SIPp paces calls by rate; at its default 10/s the one INVITE
            # would wait 100 ms before leaving.
            "-r", "1000",
            "-i", s.local_ip,
            "-t", "u1" if s.transport == "udp" else "t1",
            "-nostdin",
            # A message the scenario does not expect (another call's answer,
            # a stray response) is ignored instead of aborting the call: the
            # scenario's own timeouts still end every path.
            "-default_behaviors", "all,-abortunexp",
            "-trace_logs", "-log_file", str(folder / "outcome.log"),
            "-trace_err", "-error_file", str(folder / "errors.log"),
        ]  # fmt: skip
        if port:
            args += ["-p", str(port)]
        return args

    async def _run_in(self, folder: Path, job: SippJob, port: int, started: float) -> RunResult:
        csv = folder / "call.csv"
        fd = os.open(csv, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("SEQUENTIAL\n" + job.csv_line)
        args = self.command(job, folder, port)
        proc: subprocess.CompletedProcess[bytes] | None = None
        try:
            with trio.move_on_after(self.settings.timeout):
                proc = await trio.run_process(
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    capture_stderr=True,
                    check=False,
                    cwd=str(folder),
                    start_new_session=True,
                    deliver_cancel=_kill_group,
                )
        except OSError as exc:
            return RunResult(Outcome.FAILED, None, trio.current_time() - started, f"cannot start SIPp: {exc}")
        duration = trio.current_time() - started
        if proc is None:
            return RunResult(Outcome.KILLED, None, duration, f"killed after {self.settings.timeout:g}s")
        logged = _read_outcome(folder / "outcome.log")
        if logged is not None:
            return RunResult(logged, proc.returncode, duration)
        rc = proc.returncode
        meaning = _EXIT_MEANING.get(rc, f"exit code {rc}")
        errors = _tail(folder / "errors.log") or proc.stderr.decode(errors="replace").strip()[-300:]
        return RunResult(Outcome.FAILED, rc, duration, f"{meaning}: {errors}" if errors else meaning)


def remove_stale_folders(parent: Path | None = None) -> int:
    """Remove run folders left by workers that no longer run (``kill -9``
    skips their clean-up); returns how many. Folders of live processes,
    this one's included, are left alone."""
    parent = parent or Path(tempfile.gettempdir())
    removed = 0
    for folder in parent.glob(f"{_FOLDER_PREFIX}*-*"):
        pid_text = folder.name[len(_FOLDER_PREFIX) :].split("-", 1)[0]
        if not pid_text.isdigit() or not folder.is_dir() or _alive(int(pid_text)):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: not ours to judge
    return True


def bind_error(host: str, port: int, kind: int = socket.SOCK_STREAM) -> OSError | None:
    """Why ``host:port`` cannot be listened on now, or None when it can.
    TCP is tried as servers bind, so old TIME_WAIT connections do not count."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, kind) as s:
            if kind == socket.SOCK_STREAM:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as exc:
        return exc
    return None


def free_port(host: str, kind: int = socket.SOCK_DGRAM) -> int:
    """A port the system considers free on ``host`` now (it may be taken
    again before it is used: good enough for loopback tools and tests)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


async def _kill_group(proc: trio.Process) -> None:
    """Kill SIPp and anything it started; trio then reaps it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _read_outcome(path: Path) -> Outcome | None:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    for line in reversed(text.splitlines()):
        name = line.strip().removeprefix("outcome=")
        if line.strip().startswith("outcome=") and name in _LOGGED:
            return _LOGGED[name]
    return None


def _tail(path: Path, limit: int = 300) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()[-limit:]
    except FileNotFoundError:
        return ""
