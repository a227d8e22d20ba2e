"""Event builders shared by the tests: wire JSON as Kamailio sends it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from evapi_worker.config import EvapiSettings
from evapi_worker.events import Event, parse_event

needs_redis = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")

# Reconnect at once in tests: nodes there start and stop on purpose.
FAST_RECONNECT = EvapiSettings(reconnect_initial=0.01, reconnect_max=0.1)


def frame(event: str, ts: float, seq: int, *, node: str = "kam1", boot: int = 1, **fields: Any) -> bytes:
    """One v1 event's payload, as Kamailio's routes write it."""
    return json.dumps({"event": event, "node": node, "ts": ts, "seq": seq, "boot": boot, **fields}).encode()


class Wire:
    """Builds v1 events for one node, numbering them like Kamailio does."""

    def __init__(self, node: str = "kam1", boot: int = 1700000000) -> None:
        self.node = node
        self.boot = boot
        self.seq = 0

    def obj(self, event: str, ts: float, **fields: Any) -> dict[str, Any]:
        self.seq += 1
        return {"event": event, "node": self.node, "ts": ts, "seq": self.seq, "boot": self.boot, **fields}

    def raw(self, event: str, ts: float, **fields: Any) -> bytes:
        self.seq += 1
        return frame(event, ts, self.seq, node=self.node, boot=self.boot, **fields)

    def event(self, event: str, ts: float, **fields: Any) -> Event:
        return parse_event(self.raw(event, ts, **fields)).event

    def start(self, ts: float, call_id: str = "call-1", aor: str = "bob@example.com", **kw: Any) -> Event:
        fields = {"call_id": call_id, "aor": aor, "from_user": "alice", "from_name": "Alice", **kw}
        return self.event("call_start", ts, **fields)

    def answered(self, ts: float, call_id: str = "call-1") -> Event:
        return self.event("call_answered", ts, call_id=call_id)

    def cancelled(self, ts: float, call_id: str = "call-1") -> Event:
        return self.event("call_cancelled", ts, call_id=call_id)

    def branch_reply(self, ts: float, contact: str, code: int = 180, call_id: str = "call-1") -> Event:
        return self.event("branch_reply", ts, call_id=call_id, code=code, contact=contact)

    def failed(self, ts: float, code: int, call_id: str = "call-1") -> Event:
        return self.event("call_failed", ts, call_id=call_id, code=code)

    def register(
        self,
        ts: float,
        aor: str = "bob@example.com",
        instance: str | None = "<urn:uuid:iphone-1>",
        user_agent: str = "LinphoneiOS/5.2 (iPhone) LinphoneSDK/5.3",
        **kw: Any,
    ) -> Event:
        fields: dict[str, Any] = {
            "aor": aor,
            "contact": "sip:bob@192.0.2.10:50000;transport=udp",
            "src_ip": "127.0.0.1",
            "src_port": 50000,
            "proto": "udp",
            "expires": 600,
            "user_agent": user_agent,
            **kw,
        }
        if instance is not None:
            fields["instance"] = instance
        return self.event("register", ts, **fields)


async def stop_group(proc: trio.Process, sig: signal.Signals = signal.SIGTERM) -> None:
    """Stop a process group this test started: ``sig`` (after SIGCONT, in case
    the test froze it), up to 10 s to exit, then SIGKILL."""
    if proc.returncode is None:
        os.killpg(proc.pid, signal.SIGCONT)
        os.killpg(proc.pid, sig)
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            await proc.wait()
    if proc.returncode is None:
        os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


@asynccontextmanager
async def running_demo(out: Path, *args: str, ready_within: float = 20) -> AsyncIterator[trio.Process]:
    """The installed ``evapi-worker demo ARGS``, its output in ``out``: yields
    once it printed "Ready.", then stops it as Ctrl-C does (SIGINT to its
    group; SIGKILL if it does not end)."""
    command = [str(Path(sys.executable).with_name("evapi-worker")), "demo", *args]
    with out.open("wb") as sink:
        demo = await trio.lowlevel.open_process(command, stdout=sink, stderr=sink, start_new_session=True)
    try:
        with trio.fail_after(ready_within):
            while b"Ready." not in out.read_bytes():
                assert demo.returncode is None, out.read_text()
                await trio.sleep(0.1)
        yield demo
    finally:
        await stop_group(demo, signal.SIGINT)


def demo_folder(out: Path) -> Path:
    """The demo's Kamailio folder, from the log path it printed."""
    return Path(out.read_text().split("Kamailio's log: ")[1].split()[0].rstrip(".")).parent
