"""A real liblinphone phone for end-to-end tests: Debian's ``linphonec``.

It registers like the iPhone app does (RFC 8599 push parameters in its
Contact), rings when an INVITE comes, and keeps its own call history, the
same liblinphone code that fills the app's call log. Tests read that history
both as ``linphonec`` prints it (``call-logs``: ``Status: answered
elsewhere``...) and from its call-log database (the Call-ID).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

needs_linphonec = pytest.mark.skipif(
    shutil.which("linphonec") is None, reason="needs linphonec (apt-get install linphone-cli)"
)

# liblinphone's LinphoneCallStatus, as stored in its call-log database.
CALL_STATUS = {
    0: "success",
    1: "aborted",
    2: "missed",
    3: "declined",
    4: "early aborted",
    5: "accepted elsewhere",
    6: "declined elsewhere",
}


@dataclass(frozen=True)
class CallLog:
    """One entry of the phone's own call history."""

    call_id: str
    status: str  # as liblinphone stores it (CALL_STATUS)
    printed: str  # the "Status:" line linphonec prints for it


@dataclass
class Linphone:
    """One linphonec process registered as ``user@domain`` through ``proxy``
    (``host:port``, ``[v6]:port`` for IPv6) over ``transport`` (udp, tcp or tls)."""

    folder: Path
    user: str
    domain: str
    proxy: str
    transport: str = "udp"
    password: str | None = None
    push_token: str = "0A1B2C3D4E5F"
    auto_answer: bool = False  # answers every incoming call at once (linphonec -a)
    instance: str | None = None  # its +sip.instance is urn:uuid:INSTANCE (liblinphone's [misc] uuid); None: its own
    process: trio.Process | None = field(default=None, init=False)
    output: bytearray = field(default_factory=bytearray, init=False)

    @property
    def calls_db(self) -> Path:
        return self.folder / "calls.sqlite"

    def _rc(self) -> str:
        ports = {"udp": (-1, 0, 0), "tcp": (0, -1, 0), "tls": (0, 0, -1)}[self.transport]
        rc = f"""[sip]
sip_port={ports[0]}
sip_tcp_port={ports[1]}
sip_tls_port={ports[2]}
default_proxy=0
use_ipv6={1 if self.proxy.startswith("[") else 0}
verify_server_certs=0
verify_server_cn=0
[proxy_0]
reg_proxy=<sip:{self.proxy};transport={self.transport}>
reg_identity=sip:{self.user}@{self.domain}
reg_expires=600
reg_sendregister=1
contact_uri_parameters=pn-provider=apns;pn-prid={self.push_token};pn-param=ABCD1234.org.linphone.phone.voip
[storage]
uri={self.folder / "linphone.sqlite"}
call_logs_db_uri={self.calls_db}
[sound]
echocancellation=0
"""
        if self.instance is not None:
            rc += f"[misc]\nuuid={self.instance}\n"
        if self.password is not None:
            rc += f"""[auth_info_0]
username={self.user}
passwd={self.password}
realm={self.domain}
domain={self.domain}
"""
        return rc

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Linphone]:
        """Start linphonec; stop it (and its children) after."""
        self.folder.mkdir(parents=True, exist_ok=True)
        home = self.folder / "home"
        home.mkdir(exist_ok=True)
        rc = self.folder / "linphonerc"
        rc.write_text(self._rc())
        binary = shutil.which("linphonec") or "linphonec"
        env = {**os.environ, "HOME": str(home)}
        self.process = await trio.lowlevel.open_process(
            [binary, "-c", str(rc), "-d", "6", "-l", str(self.folder / "linphone.log")]
            + (["-a"] if self.auto_answer else []),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read)
                yield self
                nursery.cancel_scope.deadline = trio.current_time() + 5
                await self._quit()
        finally:
            if self.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await self.process.wait()

    async def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        async for chunk in self.process.stdout:
            self.output.extend(chunk)

    async def command(self, line: str) -> None:
        assert self.process is not None and self.process.stdin is not None
        await self.process.stdin.send_all(line.encode() + b"\n")

    async def _quit(self) -> None:
        assert self.process is not None
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.command("quit")
        with trio.move_on_after(5):
            await self.process.wait()

    async def wait_call_logs(self, count: int = 1, timeout: float = 10.0) -> list[CallLog]:
        """The call history once it has ``count`` entries (liblinphone
        writes an entry when the call has ended on its side)."""
        with trio.fail_after(timeout):
            while True:
                if self.calls_db.exists() and len(logs := await self.call_logs()) >= count:
                    return logs
                await trio.sleep(0.1)

    def call_duration(self, call_id: str) -> int | None:
        """The duration (s) liblinphone recorded for the call ``call_id``."""
        with contextlib.closing(sqlite3.connect(self.calls_db)) as db:
            row = db.execute("SELECT duration FROM call_history WHERE call_id = ?", (call_id,)).fetchone()
        return None if row is None else int(row[0])

    async def call_logs(self) -> list[CallLog]:
        """The phone's call history: Call-ID and status from its database,
        and the status line linphonec prints for each entry."""
        before = len(self.output)
        await self.command("call-logs")
        with trio.move_on_after(5):
            while b"Status:" not in self.output[before:]:
                await trio.sleep(0.05)
        printed = [
            line.split("Status:", 1)[1].strip()
            for line in self.output[before:].decode(errors="replace").splitlines()
            if line.startswith("Status:")
        ]
        with contextlib.closing(sqlite3.connect(self.calls_db)) as db:
            rows = db.execute("SELECT call_id, status FROM call_history ORDER BY id").fetchall()
        return [
            CallLog(str(call_id), CALL_STATUS.get(int(status), str(status)), text)
            for (call_id, status), text in zip(rows, printed, strict=False)
        ]
