"""Run fake calls on long-lived SIPp processes, and always reap them.

A process per fake call costs a process start per late phone and caps a
burst at the processes the machine can run. Here each SIPp runs the
scenario as a 3PCC controller B and carries many calls at once: the worker
starts each call with one message on SIPp's twin socket and reads its
outcome back the same way (sipp_twin.py). SIPp keeps one call per Call-ID,
so several devices of one call go to different processes; a node gets
more processes only for that.

SIPp is started with an argument list (never a shell), in its own session
so that a shutdown kills it and anything it started with one ``killpg``,
and tied to the worker's life (children.py): a worker killed with SIGKILL
leaves no SIPp behind. Its twin socket admits the worker's connection and
no other (twin_guard.py). Its error log and pid file live in a private
temporary folder, removed when it ends. No pin key touches the disk.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import shutil
import socket
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Final, Literal

import msgspec
import trio

from . import twin_guard
from .bundled import bundled
from .children import PID_FILE, ChildProcess, end_left_child
from .core import sipp_twin as twin
from .core.outcomes import Outcome
from .core.sip_values import bracketed
from .logs import kv
from .net import free_media_port, free_port
from .outbox import Outbox, OutboxFull
from .slots import FairSlots

__all__ = [
    "Reservation",
    "RunResult",
    "SippJob",
    "SippRunner",
    "SippSettings",
    "bundled_scenario",
    "remove_stale_folders",
]

# A process's private folder is named after the worker's process id, so that folders a killed worker left behind can be
# told from those of workers still running on the same host.
_FOLDER_PREFIX: Final = "evapi-worker-sipp-"

log = logging.getLogger("evapi_worker.sipp")


def bundled_scenario() -> Path:
    """Path of the scenario shipped inside the package."""
    return bundled("sipp", "late_call.xml")


# The outcomes the scenario itself reports on the twin socket.
_REPORTED: Final = {
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
# What an outcome the scenario reports means, for the log line of a call
# that went wrong (an operator reads this, not the scenario).
_MEANING: Final = {
    Outcome.UNREACHABLE: "Kamailio answered 477: it could not send to the device (its TCP/TLS connection is gone, "
    "or Kamailio is short of shared memory or of TCP connections: docs/deploy.md)",
    Outcome.TIMEOUT: "the device did not ring in time; cancelled",
    Outcome.NO_RESPONSE: "nothing came back from Kamailio, not even 100 Trying",
    Outcome.GAVE_UP: "the device did not end the call within 2 s of its CANCEL (it ignores the CANCEL), "
    "or Kamailio never answered the CANCEL",
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
    max_concurrent: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 1000  # fake calls at once
    max_per_account: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 100  # of them for one account
    processes: Annotated[int, msgspec.Meta(ge=1, le=256)] = 16  # SIPp processes per node at most
    timeout: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0  # one fake call at most
    local_ip: Annotated[str, msgspec.Meta(min_length=1)] = "127.0.0.1"
    port_base: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0  # 0: a free port the system picks for each process
    transport: Literal["udp", "tcp"] = "udp"  # from SIPp to Kamailio

    def __post_init__(self) -> None:
        if self.port_base and self.port_base + self.processes > 65536:
            raise ValueError("port_base: leaves no room for a port per SIPp process")


@dataclass(frozen=True, slots=True)
class SippJob:
    """Everything one fake call needs; all values already checked by sip_values."""

    call_id: str  # the original Call-ID
    fields: tuple[str, ...]  # callee user, callee domain, caller user, caller domain, pin, reason
    name: str  # the caller's display name, quoted with a trailing space, or ""
    remote_host: str
    remote_port: int


@dataclass(frozen=True, slots=True)
class RunResult:
    outcome: Outcome
    duration: float
    detail: str = ""


@dataclass(eq=False)
class _Call:
    job: str
    done: trio.Event = field(default_factory=trio.Event)
    outcome: Outcome = Outcome.FAILED
    detail: str = ""


@dataclass(eq=False)
class Reservation:
    """A fake call's place in one SIPp process (its Call-ID held there)."""

    call_id: str
    sipp: _Sipp
    call: _Call


_IDLE_STOP: Final = 60.0  # seconds an idle process (not a node's first) is kept
_START_TIMEOUT: Final = 5.0  # seconds for a new SIPp to open its twin socket
_START_ATTEMPTS: Final = 3  # a port taken between our check and SIPp's bind
_EXIT_WAIT: Final = 1.0  # seconds to let SIPp be reaped once its twin socket closed


class _TwinTaken(Exception):
    """Another connection reached SIPp's twin socket before the worker's was alone on it."""


class _Sipp:
    """One long-lived SIPp process for one node, and its twin socket."""

    def __init__(self, remote: tuple[str, int]) -> None:
        self.remote = remote
        self.calls: dict[str, _Call] = {}  # by Call-ID: one call per Call-ID in a process
        self.ready = trio.Event()
        self.error: str | None = None  # set when it cannot take calls: start failed or exited
        self.stream: trio.SocketStream | None = None
        self.outbox = Outbox()  # written to the twin socket once connected
        self.port = 0
        self.idle_since = trio.current_time()

    def fail_all(self, why: str) -> None:
        self.error = self.error or why
        for call in self.calls.values():
            if not call.done.is_set():
                call.outcome, call.detail = Outcome.FAILED, why
                call.done.set()
        self.ready.set()

    def send(self, data: bytes) -> None:
        """Queue a command for SIPp (see outbox.py); never waits."""
        self.outbox.put(data)


class SippRunner:
    """Runs fake calls on long-lived SIPp processes, each carrying many
    calls at once (see sipp_twin.py): at most ``processes`` per node, more
    only when a burst holds several devices of one call (one Call-ID per
    process). :meth:`serve` runs the processes; :attr:`slots` bounds the
    fake calls at once, fairly between accounts."""

    def __init__(self, settings: SippSettings) -> None:
        self.settings = settings
        self.scenario = settings.scenario or bundled_scenario()
        # A tenth more slots for accounts with no fake call in flight: the
        # next account's first late phone never waits behind rude ones.
        self.slots = FairSlots(
            settings.max_concurrent,
            min(settings.max_per_account, settings.max_concurrent),
            reserve=max(1, settings.max_concurrent // 10),
        )
        self._pools: dict[tuple[str, int], list[_Sipp]] = {}
        self._changed = trio.Event()  # a process took or freed a Call-ID, started or ended
        self._nursery: trio.Nursery | None = None
        self._jobs = itertools.count(1)
        self._ports_used: set[int] = set()
        self._warned_unguarded = False

    @property
    def running(self) -> int:
        """Fake calls holding a slot (pinning, or in SIPp)."""
        return self.slots.borrowed

    @property
    def waiting(self) -> int:
        """Fake calls waiting for a slot."""
        return self.slots.waiting

    @property
    def processes(self) -> int:
        return sum(len(pool) for pool in self._pools.values())

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run SIPp processes as calls need them, until cancelled (they are
        stopped then: closing the twin socket ends SIPp, a kill follows)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    async def reserve(self, job: SippJob, deadline: float = math.inf) -> Reservation | None:
        """Hold a place for ``job`` in a process free of its Call-ID (the
        least busy, or a new one), no later than ``deadline``: None once it
        passed (every process holds a device of this call). Made before the
        pin, so the INVITE follows the pin at once; :meth:`release` it if
        the call is not run."""
        if self._nursery is None:
            raise RuntimeError("the SIPp runner is not serving")
        # A free place is taken at once, without a cancel scope (the usual
        # case: scopes were a tenth of the worker's time in a burst).
        sipp = self._free_process(job)
        if sipp is None:
            with trio.move_on_at(deadline):
                sipp = await self._process_for(job)
            if sipp is None:
                return None
        return Reservation(job.call_id, sipp, sipp.calls[job.call_id])

    def release(self, reservation: Reservation) -> None:
        """Give back a place (run or not); releasing twice does nothing."""
        sipp, call = reservation.sipp, reservation.call
        if sipp.calls.get(reservation.call_id) is call:
            del sipp.calls[reservation.call_id]
            if not sipp.calls:
                sipp.idle_since = trio.current_time()
            self._wake()

    async def run(self, job: SippJob, reservation: Reservation | None = None) -> RunResult:
        """Run one fake call in its reserved place (or one found now); the
        caller holds a slot of :attr:`slots`."""
        started = trio.current_time()
        if self._nursery is None:
            return RunResult(Outcome.FAILED, 0.0, "the SIPp runner is not serving")
        try:
            with trio.move_on_after(self.settings.timeout) as scope:
                if reservation is None:
                    reservation = await self.reserve(job)
                assert reservation is not None
                sipp, call = reservation.sipp, reservation.call
                if not sipp.ready.is_set():
                    await sipp.ready.wait()
                if sipp.error is None:
                    try:
                        sipp.send(twin.call_message(job.call_id, call.job, job.fields, job.name))
                    except (trio.ClosedResourceError, OutboxFull) as exc:
                        sipp.fail_all(f"SIPp's twin socket failed: {exc!r}")
                    except twin.TwinError as exc:
                        return RunResult(Outcome.UNSAFE, trio.current_time() - started, str(exc))
                await call.done.wait()
            duration = trio.current_time() - started
            if scope.cancelled_caught:
                if reservation is None:
                    return RunResult(Outcome.KILLED, duration, "no SIPp process free for this Call-ID")
                with contextlib.suppress(trio.ClosedResourceError, OutboxFull):
                    reservation.sipp.send(twin.abort_message(job.call_id))
                return RunResult(Outcome.KILLED, duration, f"aborted after {self.settings.timeout:g}s")
            assert reservation is not None
            return RunResult(reservation.call.outcome, duration, reservation.call.detail)
        finally:
            if reservation is not None:
                self.release(reservation)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _process_for(self, job: SippJob) -> _Sipp:
        """A process that holds no call with this Call-ID (the least busy),
        or a new one; the Call-ID is reserved in it at once."""
        while (sipp := self._free_process(job)) is None:
            await self._changed.wait()  # every process holds a device of this call
        return sipp

    def _free_process(self, job: SippJob) -> _Sipp | None:
        """:meth:`_process_for` without waiting: None when every process
        (and as many as may run) holds a device of this call."""
        assert self._nursery is not None
        remote = (job.remote_host, job.remote_port)
        pool = self._pools.setdefault(remote, [])
        free = [s for s in pool if s.error is None and job.call_id not in s.calls]
        if free:
            sipp = min(free, key=lambda s: len(s.calls))
        elif len(pool) < self.settings.processes:
            sipp = _Sipp(remote)
            pool.append(sipp)
            self._nursery.start_soon(self._keep, sipp)
        else:
            return None
        sipp.calls[job.call_id] = _Call(f"{next(self._jobs):x}")
        return sipp

    async def _keep(self, sipp: _Sipp) -> None:
        """Start ``sipp``, read its replies, and remove it once it ends."""
        pool = self._pools[sipp.remote]
        try:
            with tempfile.TemporaryDirectory(prefix=f"{_FOLDER_PREFIX}{os.getpid()}-") as tmp:
                await self._start_and_read(sipp, Path(tmp))
        except OSError as exc:
            sipp.fail_all(f"cannot prepare SIPp: {exc}")
        except Exception as exc:  # the error boundary of one process: its calls fail, the worker goes on
            log.exception("sipp process failed %s", kv(error=repr(exc)))
            sipp.fail_all(f"SIPp process failed: {exc!r}")
        finally:
            sipp.fail_all("SIPp stopped")
            if sipp in pool:
                pool.remove(sipp)
            self._ports_used.discard(sipp.port)
            self._wake()

    async def _start_and_read(self, sipp: _Sipp, folder: Path) -> None:
        taken: list[int] = []  # ports another program held: skipped by this start's next attempts only
        try:
            await self._start_attempts(sipp, folder, taken)
        finally:
            self._ports_used.difference_update(taken)

    async def _start_attempts(self, sipp: _Sipp, folder: Path, taken: list[int]) -> None:
        for attempt in range(1, _START_ATTEMPTS + 1):
            if sipp.port:
                taken.append(sipp.port)
            sipp.port = self._sip_port()
            twin_port = free_port("127.0.0.1", socket.SOCK_STREAM)
            media_port = free_media_port(self.settings.local_ip)
            args = self.command(sipp.remote, folder, sipp.port, twin_port, media_port)
            (folder / PID_FILE).unlink(missing_ok=True)
            try:
                with (folder / "stderr.log").open("ab") as stderr:
                    process = ChildProcess.start(args, stderr=stderr, cwd=folder, pid_file=folder / PID_FILE)
            except OSError as exc:
                sipp.fail_all(f"cannot start SIPp: {exc}")
                return
            try:
                try:
                    stream = await self._connect(process, twin_port)
                except _TwinTaken as exc:
                    log.warning("sipp twin socket taken %s", kv(pid=process.pid, attempt=attempt, peers=str(exc)))
                    if attempt < _START_ATTEMPTS:
                        continue
                    sipp.fail_all("SIPp's twin socket was taken by another connection at each start")
                    return
                if stream is None:
                    rc = await process.wait()
                    why = _exit_text(rc, folder)
                    if rc in (254, 255) and attempt < _START_ATTEMPTS and "bind" in why.lower():
                        log.warning("sipp start retried %s", kv(attempt=attempt, error=why))
                        continue
                    sipp.fail_all(f"SIPp did not start: {why}")
                    return
                sipp.stream = stream
                sipp.ready.set()
                log.info(
                    "sipp started %s", kv(pid=process.pid, remote=f"{sipp.remote[0]}:{sipp.remote[1]}", port=sipp.port)
                )
                await self._read(sipp, stream, process)
                # SIPp's socket closes a moment before the process is reaped: wait
                # briefly so the failure names the exit code and SIPp's own words.
                code = None
                with trio.move_on_after(_EXIT_WAIT):
                    code = await process.wait()
                sipp.fail_all(
                    f"SIPp exited: {_exit_text(code, folder)}" if code is not None else "SIPp's twin socket closed"
                )
                return
            finally:
                await self._stop(process, sipp)

    def _sip_port(self) -> int:
        if not self.settings.port_base:
            kind = socket.SOCK_DGRAM if self.settings.transport == "udp" else socket.SOCK_STREAM
            try:
                return free_port(self.settings.local_ip, kind)
            except OSError:
                return 0  # let SIPp pick; it says if it cannot bind
        port = self.settings.port_base
        while port in self._ports_used:
            port += 1
        self._ports_used.add(port)
        return port

    async def _connect(self, process: ChildProcess, port: int) -> trio.SocketStream | None:
        """The twin socket, once SIPp listens on it, guarded (twin_guard.py);
        None if SIPp exited first. _TwinTaken if another connection got in."""
        with trio.move_on_after(_START_TIMEOUT):
            while process.poll() is None:
                try:
                    listener = twin_guard.listener_of(process.pid, port)
                except twin_guard.GuardUnavailable as exc:
                    self._unguarded(str(exc))
                    return await self._connect_unguarded(process, port)
                if listener is None:
                    await trio.sleep(0.01)
                    continue
                with listener:
                    return await self._connect_guarded(process, port, listener)
        if process.poll() is None:
            process.kill_group()
        return None

    async def _connect_guarded(
        self, process: ChildProcess, port: int, listener: socket.socket
    ) -> trio.SocketStream | None:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            await sock.bind(("127.0.0.1", 0))
            ours: tuple[str, int] = sock.getsockname()
            twin_guard.admit_only(listener, ours)
            await sock.connect(("127.0.0.1", port))
            # Once SIPp accepted it, nothing else may have been accepted or be waiting.
            while True:
                peers = twin_guard.peers_of(process.pid, port)
                strangers = [f"{host}:{peer_port}" for host, peer_port in peers if (host, peer_port) != ours]
                if strangers:
                    raise _TwinTaken(",".join(strangers))
                if ours in peers:
                    break
                if process.poll() is not None:
                    sock.close()
                    return None
                await trio.sleep(0.005)
            if twin_guard.queued(listener):
                raise _TwinTaken("a connection waiting to be accepted")
        except BaseException:
            sock.close()
            raise
        return trio.SocketStream(sock)

    async def _connect_unguarded(self, process: ChildProcess, port: int) -> trio.SocketStream | None:
        while process.poll() is None:
            try:
                return await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.01)
        return None

    def _unguarded(self, why: str) -> None:
        if not self._warned_unguarded:
            self._warned_unguarded = True
            log.warning(
                "sipp twin socket unguarded %s",
                kv(error=why, meaning="SIPp's twin socket listens on every address: firewall its ports"),
            )

    async def _read(self, sipp: _Sipp, stream: trio.SocketStream, process: ChildProcess) -> None:
        reader = twin.TwinReader()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._stop_when_idle, sipp, nursery.cancel_scope)
            nursery.start_soon(self._write, sipp, stream, nursery.cancel_scope)
            while True:
                try:
                    data = await stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    break
                if not data:
                    break
                try:
                    messages = reader.feed(data)
                except twin.TwinError as exc:
                    log.warning("sipp twin error %s", kv(pid=process.pid, error=str(exc)))
                    break
                for message in messages:
                    self._on_reply(sipp, message)
            nursery.cancel_scope.cancel()

    async def _write(self, sipp: _Sipp, stream: trio.SocketStream, scope: trio.CancelScope) -> None:
        try:
            await sipp.outbox.write_to(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            sipp.fail_all(f"SIPp's twin socket failed: {exc!r}")
            scope.cancel()

    def _on_reply(self, sipp: _Sipp, message: bytes) -> None:
        try:
            reply = twin.parse_reply(message)
        except twin.TwinError as exc:
            log.warning("sipp twin error %s", kv(error=str(exc)))
            return
        call = sipp.calls.get(reply.call_id)
        if call is None or call.done.is_set():
            return  # a call aborted past its time, or one SIPp made for a stray message
        if reply.job is None:
            call.outcome, call.detail = Outcome.FAILED, "SIPp aborted the call"
        elif reply.job != call.job:
            return
        else:
            call.outcome = _REPORTED.get(reply.outcome or "", Outcome.FAILED)
            if call.outcome is Outcome.FAILED:
                call.detail = f"unknown outcome {reply.outcome!r} from the scenario"
            else:
                call.detail = _MEANING.get(call.outcome, "")
        call.done.set()

    async def _stop_when_idle(self, sipp: _Sipp, scope: trio.CancelScope) -> None:
        """A node's first process stays; the others end after a minute idle."""
        pool = self._pools[sipp.remote]
        while True:
            await trio.sleep(_IDLE_STOP / 4)
            idle = not sipp.calls and trio.current_time() - sipp.idle_since >= _IDLE_STOP
            if idle and pool and pool[0] is not sipp:
                sipp.error = "stopped when idle"  # takes no new call from here
                scope.cancel()
                return

    async def _stop(self, process: ChildProcess, sipp: _Sipp) -> None:
        """End SIPp: closing its twin socket makes it exit; kill if it lingers."""
        with trio.CancelScope(shield=True):
            if sipp.stream is not None:
                await trio.aclose_forcefully(sipp.stream)
            with trio.move_on_after(1):
                await process.wait()
            if process.poll() is None:
                process.kill_group()
                await process.wait()

    def command(self, remote: tuple[str, int], folder: Path, port: int, twin_port: int, media_port: int) -> list[str]:
        s = self.settings
        args = [
            s.binary,
            f"{bracketed(remote[0])}:{remote[1]}",
            "-sf", str(self.scenario),
            "-3pcc", f"127.0.0.1:{twin_port}",
            "-mp", str(media_port),
            "-i", s.local_ip,
            "-t", "u1" if s.transport == "udp" else "t1",
            "-nostdin",
            # A message the scenario does not expect (another call's answer,
            # a stray response) is ignored instead of aborting the call: the
            # scenario's own timeouts still end every path.
            "-default_behaviors", "all,-abortunexp",
            # The scenario's reply for a device that never answers waits for
            # the INVITE's retransmissions to end: three (0.5, 1, 2 s); a
            # CANCEL nobody answers, four (reported after 11.5 s).
            "-max_invite_retrans", "3", "-max_non_invite_retrans", "4",
            # Hundreds of calls' answers at once: room for them in the socket
            # buffers (SIPp's default is 64 KiB; the kernel caps it at
            # net.core.rmem_max / wmem_max).
            "-buff_size", "4194304",
            # An ended call leaves no "dead call" behind under its Call-ID
            # (SIPp keeps one 33 s by default): it would swallow the next
            # fake call to another device of the same call.
            "-deadcall_wait", "0",
            "-trace_err", "-error_file", str(folder / "errors.log"), "-max_log_size", "1048576",
        ]  # fmt: skip
        if port:
            args += ["-p", str(port)]
        return args


def _exit_text(rc: int | None, folder: Path) -> str:
    meaning = _EXIT_MEANING.get(rc, f"exit code {rc}") if rc is not None else "still running"
    errors = _tail(folder / "errors.log") or _tail(folder / "stderr.log")
    return f"{meaning}: {errors}" if errors else meaning


def remove_stale_folders(parent: Path | None = None) -> int:
    """Remove run folders left by workers that no longer run (``kill -9``
    skips their clean-up), ending the SIPp a folder's pid file names if it
    still runs (see children.py); returns how many folders. Folders of live
    processes, this one's included, and folders not this user's are left
    alone."""
    parent = parent or Path(tempfile.gettempdir())
    removed = 0
    for folder in parent.glob(f"{_FOLDER_PREFIX}*-*"):
        pid_text = folder.name[len(_FOLDER_PREFIX) :].split("-", 1)[0]
        if not pid_text.isdigit() or _alive(int(pid_text)):
            continue
        try:
            info = folder.lstat()
        except OSError:
            continue
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
            continue
        end_left_child(folder)
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


def _tail(path: Path, limit: int = 300) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()[-limit:]
    except FileNotFoundError:
        return ""
