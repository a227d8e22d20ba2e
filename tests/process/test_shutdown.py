"""Graceful stop: intake ends, fake calls get a grace period, state survives a restart."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio

from evapi_worker.config import Config
from evapi_worker.core.engine import Action, Decision
from evapi_worker.core.links import NodeAddress
from evapi_worker.service import Service
from evapi_worker.sipp_runner import SippSettings

from ..evapi_server import EvapiServer
from ..helpers import frame
from ..sipp_device import alive, fake_runs, fake_sipp, fake_starts

T0 = 1_700_000_000.0
STAMPED_FROM_NOW = True  # T0 is set as each test starts (conftest.py)


REG: dict[str, Any] = {
    "aor": "bob@x",
    "contact": "sip:bob@127.0.0.1:5099",
    "src_ip": "127.0.0.1",
    "src_port": 5099,
    "proto": "udp",
    "expires": 600,
    "user_agent": "LinphoneiOS/5",
    "instance": "<urn:uuid:i1>",
}


async def test_a_restart_inside_the_window_loses_no_late_registration(tmp_path: Path) -> None:
    state = tmp_path / "state.msgpack"
    config = Config(state_file=state)
    first = Service(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(first.run)
        now = trio.current_time()
        first.on_frame("kam1", frame("call_start", T0, 1, call_id="c1", aor="bob@x", from_user="alice"), now)
        first.on_frame("kam1", frame("call_cancelled", T0 + 2, 2, call_id="c1"), now)
        await first.stop()
        nursery.cancel_scope.cancel()
    assert state.is_file()
    assert state.stat().st_mode & 0o777 == 0o600  # push tokens: the worker's user alone

    second = Service(config)
    decisions: list[Decision] = []
    second.decision_listeners.append(decisions.append)
    async with trio.open_nursery() as nursery:
        await nursery.start(second.run)
        assert second.engine.call_count == 1
        second.on_frame("kam1", frame("register", T0 + 4, 3, **REG), trio.current_time())
        nursery.cancel_scope.cancel()
    assert [(d.action, d.reason, d.call_id) for d in decisions] == [(Action.FAKE_CALL, "missed", "c1")]


async def test_a_broken_state_file_is_reported_and_the_worker_starts_empty(tmp_path: Path) -> None:
    state = tmp_path / "state.msgpack"
    state.write_bytes(b"\x00garbage")
    service = Service(Config(state_file=state))
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        assert service.engine.call_count == 0
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def a_fake_call_in_sipp(tmp_path: Path, *sipp: str, grace: float) -> AsyncIterator[tuple[Service, EvapiServer]]:
    """A worker whose one fake call (a late iPhone of an answered call) is in
    SIPp, the fake SIPp run with ``sipp``."""
    fake = fake_sipp(tmp_path, *sipp)
    server = EvapiServer()
    async with trio.open_nursery() as outer:
        await server.start(outer)
        node = NodeAddress("kam1", "127.0.0.1", server.port, "127.0.0.1", 5099)
        service = Service(Config(nodes=(node,), sipp=SippSettings(binary=str(fake)), shutdown_grace=grace))
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            await server.wait_for(lambda: bool(server.streams))
            await server.send(
                server.event("call_start", T0, call_id="c1", aor="bob@x", from_user="alice")
                + server.event("call_answered", T0 + 1, call_id="c1")
                + server.event("register", T0 + 2, **REG)
            )
            with trio.fail_after(5):
                while not fake_runs(tmp_path):
                    await trio.sleep(0.01)
            yield service, server
            nursery.cancel_scope.cancel()
        outer.cancel_scope.cancel()


async def test_stop_closes_intake_and_waits_for_running_fake_calls_within_the_grace(tmp_path: Path) -> None:
    async with a_fake_call_in_sipp(tmp_path, "--delay", "0.5", grace=5) as (service, server):
        started = trio.current_time()
        await service.stop()
        # The fake call finished and the stop returned then, before its 5 s
        # grace ran out.
        assert service.actions.begun == 0
        assert service.metrics.value("evapi_worker_fake_calls_total", {"outcome": "completed"}) == 1
        assert trio.current_time() - started < 5
        await server.wait_for(lambda: not server.streams)  # intake closed
    assert service.metrics.value("evapi_worker_fake_calls_total", {"outcome": "completed"}) == 1


async def test_stop_gives_up_at_the_grace_and_the_cancel_kills_sipp(tmp_path: Path) -> None:
    async with a_fake_call_in_sipp(tmp_path, "--silent", grace=0.3) as (service, _):
        started = trio.current_time()
        await service.stop()
        assert trio.current_time() - started >= 0.3  # it waited the grace...
        assert service.actions.begun == 1  # ...and gave up on the call still in SIPp
        [(pid, _)] = fake_starts(tmp_path)
    assert service.metrics.value("evapi_worker_fake_calls_total", {"outcome": "killed"}) == 1
    with trio.fail_after(5):  # its SIPp ended with it
        while alive(pid):
            await trio.sleep(0.02)


async def test_sigterm_to_the_command_stops_gracefully_and_writes_the_state(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    state = tmp_path / "state.msgpack"
    args = [
        sys.executable, "-m", "evapi_worker.cli", "run", "--kamailio", "127.0.0.1:9",
        "--metrics", "off", "--state", str(state), "--sipp", sys.executable,
    ]  # fmt: skip
    proc = await trio.lowlevel.open_process(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    await trio.sleep(1.5)
    proc.send_signal(signal.SIGTERM)
    with trio.fail_after(15):
        code = await proc.wait()
    assert proc.stderr is not None
    err = (await proc.stderr.receive_some(65536)).decode()
    assert code == 0, err
    assert state.is_file()
    assert "state saved" in err


def state_file_with(tmp_path: Path, **damage: object) -> Path:
    """A snapshot of two calls, the second with ``damage``."""
    state = tmp_path / "state.msgpack"
    sound: dict[str, object] = {
        "call_id": "c@x", "aor": "bob@example.com", "started": None, "end_ts": 1.0, "end": "answered",
        "end_code": None, "expires_at": 10.0, "decided": {}, "rang": [],
    }  # fmt: skip
    snapshot = {
        "version": 2, "saved_at": time.time(), "clock": 0.0, "journal": 1,
        "engine": {"calls": [sound, {**sound, "call_id": "d@x", **damage}], "devices": []}, "actions": [],
    }  # fmt: skip
    state.write_bytes(msgpack.packb(snapshot))
    return state


async def test_a_sound_state_file_is_restored(tmp_path: Path) -> None:
    service = Service(Config(state_file=state_file_with(tmp_path)))
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        assert service.engine.call_count == 2
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("damage", [{"expires_at": float("inf")}, {"expires_at": 1e308}, {"end_ts": float("nan")}])
async def test_a_record_with_an_impossible_time_is_dropped_and_the_rest_restored(
    tmp_path: Path, damage: dict[str, object]
) -> None:
    state = state_file_with(tmp_path, **damage)
    service = Service(Config(state_file=state))
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)  # once crashed at every start
        assert service.engine.call_count == 1
        nursery.cancel_scope.cancel()
    assert service.metrics.value("evapi_worker_state_skipped_total", {"file": "snapshot"}) == 1


async def test_a_state_file_that_cannot_be_read_is_set_aside_and_the_worker_starts(tmp_path: Path) -> None:
    state = state_file_with(tmp_path, end="bogus")
    service = Service(Config(state_file=state))
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        assert service.engine.call_count == 0
        nursery.cancel_scope.cancel()
    assert not state.exists() and (tmp_path / "state.msgpack.bad").is_file()


async def test_a_disk_that_blocks_holds_up_no_event_and_loses_none(tmp_path: Path) -> None:
    state = tmp_path / "state.msgpack"
    service = Service(Config(state_file=state))
    disk = threading.Event()  # the disk answers when set
    appended_on: list[bool] = []  # whether each append ran on the event loop's thread
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        store = service.store
        assert store is not None
        write = store.append

        def slow_append(data: bytes) -> None:
            appended_on.append(threading.current_thread() is threading.main_thread())
            disk.wait(10)
            write(data)

        store.append = slow_append  # type: ignore[method-assign]
        for n in range(200):
            now = trio.current_time()
            call = f"c{n}"
            service.on_frame(
                "kam1", frame("call_start", T0, 3 * n + 1, call_id=call, aor=f"b{n}@x", from_user="a"), now
            )
            service.on_frame("kam1", frame("register", T0 + 1, 3 * n + 2, **{**REG, "aor": f"u{n}@x"}), now)
            service.on_frame("kam1", frame("call_answered", T0 + 2, 3 * n + 3, call_id=call), now)
            await trio.lowlevel.checkpoint()
        # Every event handled while the disk hangs; a REGISTER asked for a write at once.
        assert service.engine.call_count == 200
        with trio.fail_after(5):
            while not appended_on:
                await trio.sleep(0.01)
        disk.set()
        while_running = list(appended_on)
        await service.stop()  # its snapshot writes what is left, on the way out
        nursery.cancel_scope.cancel()
    assert while_running and not any(while_running)
    restarted = Service(Config(state_file=state))
    async with trio.open_nursery() as nursery:
        await nursery.start(restarted.run)
        assert restarted.engine.call_count == 200
        nursery.cancel_scope.cancel()
