"""A real SIPp UAS playing a phone, for tests of what a device receives."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from evapi_worker.net import free_port as sipp_free_port

SCENARIOS = Path(__file__).parent / "sipp"
PHONES = Path(__file__).parent.parent / "evapi_worker" / "sipp"
# The caller that gives up after 1.5 s (SIPp exits 0 when the call went so).
GIVES_UP = PHONES / "caller_gives_up.xml"


def scenario_path(name: str) -> Path:
    """A test-only scenario from tests/sipp, else one shipped with the package."""
    path = SCENARIOS / f"{name}.xml"
    return path if path.is_file() else PHONES / f"{name}.xml"


needs_sipp = pytest.mark.skipif(
    shutil.which("sipp") is None, reason="sipp is not installed (apt-get install sip-tester)"
)


FAKE_SIPP = Path(__file__).parent / "fake_sipp.py"


def fake_sipp(folder: Path, *options: str) -> Path:
    """A stand-in for the sipp binary (tests/fake_sipp.py with ``options``:
    ``--delay S``, ``--outcome NAME``, ``--silent``, ``--die-after N``,
    ``--exit CODE --say TEXT``) that notes what it is told in ``runs.txt``
    beside it: for the runner's own behaviour, where no SIP is needed."""
    path = folder / "sipp"
    record = folder / "runs.txt"
    path.write_text(f'#!/bin/sh\nexec {sys.executable} {FAKE_SIPP} {" ".join(options)} --record {record} -- "$@"\n')
    path.chmod(0o755)
    return path


def fake_runs(folder: Path) -> list[str]:
    """The Call-IDs of the fake calls a :func:`fake_sipp` in ``folder`` was given."""
    path = folder / "runs.txt"
    if not path.exists():
        return []
    return [line.split("Call-ID: ")[1].split(" |")[0] for line in path.read_text().splitlines() if "X-Evw-Call" in line]


def fake_starts(folder: Path) -> list[tuple[int, str]]:
    """(pid, arguments) of each :func:`fake_sipp` process started in ``folder``."""
    path = folder / "runs.txt"
    if not path.exists():
        return []
    starts = [line.split(" ", 2)[1:] for line in path.read_text().splitlines() if line.startswith("start ")]
    return [(int(pid.removeprefix("pid=")), args.removeprefix("args=")) for pid, args in starts]


def sipp_children(parent: int) -> dict[int, int]:
    """{pid: twin port} of the SIPp processes (any with ``-3pcc``) ``parent`` started."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = (Path("/proc") / entry / "stat").read_text()
            args = (Path("/proc") / entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) == parent and b"-3pcc" in args:
            found[int(entry)] = int(args[args.index(b"-3pcc") + 1].rsplit(b":", 1)[1])
    return found


def alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    return sipp_free_port("127.0.0.1", kind)


def free_sip_port() -> int:
    """A port free on 127.0.0.1 for both UDP and TCP (Kamailio listens on
    both with one number)."""
    for _ in range(50):
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise OSError("no port free for both UDP and TCP")


def _port_taken(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False


@dataclass
class Device:
    port: int
    log: Path
    process: trio.Process

    def lines(self) -> list[str]:
        try:
            return self.log.read_text().splitlines()
        except FileNotFoundError:
            return []

    async def finished(self, timeout: float = 15.0) -> int:
        with trio.fail_after(timeout):
            return await self.process.wait()


@asynccontextmanager
async def device(scenario: str, folder: Path, *, port: int | None = None, calls: int = 1) -> AsyncIterator[Device]:
    """Run a phone scenario as a UAS on 127.0.0.1 until it ends or the block exits."""
    port = port or free_port()
    log = folder / f"{scenario}-{port}.log"
    args = [
        "sipp", "-sf", str(scenario_path(scenario)), "-i", "127.0.0.1", "-p", str(port),
        "-m", str(calls), "-nostdin", "-trace_logs", "-log_file", str(log),
    ]  # fmt: skip
    proc = await trio.lowlevel.open_process(
        args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        cwd=str(folder), start_new_session=True,
    )  # fmt: skip
    try:
        with trio.fail_after(5):
            while not _port_taken(port):
                await trio.sleep(0.01)
        yield Device(port, log, proc)
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
        with trio.CancelScope(shield=True):
            await proc.wait()
