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
from evapi_worker.core.events import Event, parse_event
from evapi_worker.lab.redis_process import RedisProcess
from evapi_worker.redis_client import RedisAddress, open_redis

needs_redis = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")


@asynccontextmanager
async def redis_with_sentinel(folder: Path) -> AsyncIterator[tuple[RedisProcess, RedisProcess, RedisProcess]]:
    """A real primary, its replica, and a sentinel watching them as ``evw``
    (which calls the primary down after half a second); all stopped after."""
    primary = RedisProcess(folder / "p")
    replica = RedisProcess(folder / "r", None, "--replicaof", "127.0.0.1", str(primary.port))
    sentinel_folder = folder / "s"
    for sub in (primary.folder, replica.folder, sentinel_folder):
        sub.mkdir(parents=True)
    config = sentinel_folder / "sentinel.conf"  # a sentinel rewrites its file: its own
    config.write_text(
        f"sentinel monitor evw 127.0.0.1 {primary.port} 1\n"
        "sentinel down-after-milliseconds evw 500\nsentinel failover-timeout evw 5000\n"
    )
    sentinel = RedisProcess(sentinel_folder, None, str(config), "--sentinel")
    try:
        for server in (primary, replica, sentinel):
            await server.start()
        yield primary, replica, sentinel
    finally:
        for server in (sentinel, replica, primary):
            await server.stop()


async def promoted(server: RedisProcess) -> None:
    """Until ``server`` is a primary (the sentinel promoted it)."""
    with trio.fail_after(20):
        while True:
            async with open_redis(RedisAddress.parse(server.url)) as conn:
                role = await conn.call("ROLE")
            if isinstance(role, list) and role[0] == b"master":
                return
            await trio.sleep(0.2)


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

    def _call(self, event: str, ts: float, call_id: str, aor: str | None, **fields: Any) -> Event:
        # aor=None: an event from routes older than its aor field.
        if aor is not None:
            fields["aor"] = aor
        return self.event(event, ts, call_id=call_id, **fields)

    def answered(self, ts: float, call_id: str = "call-1", aor: str | None = "bob@example.com") -> Event:
        return self._call("call_answered", ts, call_id, aor)

    def cancelled(self, ts: float, call_id: str = "call-1", aor: str | None = "bob@example.com") -> Event:
        return self._call("call_cancelled", ts, call_id, aor)

    def branch_reply(
        self, ts: float, contact: str, code: int = 180, call_id: str = "call-1", aor: str | None = "bob@example.com"
    ) -> Event:
        return self._call("branch_reply", ts, call_id, aor, code=code, contact=contact)

    def failed(self, ts: float, code: int, call_id: str = "call-1", aor: str | None = "bob@example.com") -> Event:
        return self._call("call_failed", ts, call_id, aor, code=code)

    def register(
        self,
        ts: float,
        aor: str = "bob@example.com",
        instance: str | None = "<urn:uuid:iphone-1>",
        user_agent: str = "LinphoneiOS/5.2 (iPhone) LinphoneSDK/5.3",
        **kw: Any,
    ) -> Event:
        return parse_event(self.register_raw(ts, aor, instance, user_agent, **kw)).event

    def register_raw(
        self,
        ts: float,
        aor: str = "bob@example.com",
        instance: str | None = "<urn:uuid:iphone-1>",
        user_agent: str = "LinphoneiOS/5.2 (iPhone) LinphoneSDK/5.3",
        **kw: Any,
    ) -> bytes:
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
        return self.raw("register", ts, **fields)


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
