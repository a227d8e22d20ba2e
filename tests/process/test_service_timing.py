"""The service's timers under Trio's autojump clock: seconds pass in no time."""

from __future__ import annotations

import itertools
import logging
import random
import socket
from typing import Any

import pytest
import trio
import trio.testing

from evapi_worker.config import Config, EvapiSettings
from evapi_worker.core.engine import Decision, EngineSettings
from evapi_worker.core.links import Backoff, NodeAddress
from evapi_worker.core.sequence import SequenceTracker
from evapi_worker.evapi_client import ConnectionState, EvapiConnection
from evapi_worker.service import Service

from ..helpers import frame
from ..sipp_device import free_port

T0 = 1_700_000_000.0
STAMPED_FROM_NOW = True  # T0 is set as each test starts (conftest.py)


async def test_settle_and_expiry_run_on_the_service_timer(autojump_clock: trio.testing.MockClock) -> None:
    service = Service(Config(engine=EngineSettings(window=15, settle=0.5, ring_timeout=60)))
    decisions: list[Decision] = []
    service.decision_listeners.append(decisions.append)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(service._timer)
        now = trio.current_time()
        service.on_frame("kam1", frame("call_start", T0, 1, call_id="c1", aor="bob@x", from_user="a"), now)
        reg: dict[str, Any] = {
            "aor": "bob@x",
            "contact": "sip:bob@h",
            "src_ip": "127.0.0.1",
            "src_port": 5060,
            "proto": "udp",
        }
        service.on_frame(
            "kam1", frame("register", T0 + 1, 2, expires=60, user_agent="LinphoneiOS", instance="<i1>", **reg), now
        )
        assert decisions == []
        await trio.sleep(0.6)  # past the settle delay: tsilo had it
        assert [(d.reason, d.device) for d in decisions] == [("ringing", "i1")]
        service.on_frame("kam1", frame("call_cancelled", T0 + 2, 3, call_id="c1"), trio.current_time())
        assert service.engine.call_count == 1
        await trio.sleep(16)  # window + settle after the end: forgotten
        assert service.engine.call_count == 0
        assert service.engine.device_count == 0
        nursery.cancel_scope.cancel()


async def test_lost_events_are_counted_after_the_grace_on_the_timer(autojump_clock: trio.testing.MockClock) -> None:
    service = Service(Config(evapi=EvapiSettings(sequence_grace=2.0)))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(service._timer)
        service.on_frame("kam1", frame("call_answered", T0, 1, call_id="a"), trio.current_time())
        service.on_frame("kam1", frame("call_answered", T0, 4, call_id="b"), trio.current_time())
        await trio.sleep(1)
        assert service.metrics.value("evapi_worker_events_lost_total", {"node": "kam1"}) == 0
        service.on_frame("kam1", frame("call_answered", T0, 2, call_id="c"), trio.current_time())  # late, not lost
        await trio.sleep(2)
        assert service.metrics.value("evapi_worker_events_lost_total", {"node": "kam1"}) == 1
        nursery.cancel_scope.cancel()


async def test_a_paused_worker_counts_no_gap_lost_that_the_unread_events_fill(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # SIGSTOP with seq 2 still in the socket: when the worker runs again its
    # timer is 25 s late, and must not count seq 2 lost before reading it.
    service = Service(Config(evapi=EvapiSettings(sequence_grace=2.0)))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(service._timer)
        service.on_frame("kam1", frame("call_answered", T0, 1, call_id="a"), trio.current_time())
        service.on_frame("kam1", frame("call_answered", T0, 3, call_id="b"), trio.current_time())
        await trio.testing.wait_all_tasks_blocked()
        autojump_clock.jump(25)  # the process is stopped: the timer wakes late
        await trio.testing.wait_all_tasks_blocked()
        assert service.metrics.value("evapi_worker_paused_seconds_total") >= 24.5
        service.on_frame("kam1", frame("call_answered", T0, 2, call_id="c"), trio.current_time())
        service.on_frame("kam1", frame("call_answered", T0, 5, call_id="d"), trio.current_time())
        await trio.sleep(3)  # seq 4 never comes: lost after the grace
        assert service.metrics.value("evapi_worker_events_lost_total", {"node": "kam1"}) == 1
        nursery.cancel_scope.cancel()


async def test_reconnect_attempts_back_off_up_to_the_cap(autojump_clock: trio.testing.MockClock) -> None:
    port = free_port(socket.SOCK_STREAM)  # nothing listens here: every attempt is refused
    attempts: list[float] = []

    def on_state(node: str, state: ConnectionState) -> None:
        if state is ConnectionState.CONNECTING:
            attempts.append(trio.current_time())

    conn = EvapiConnection(
        NodeAddress("kam1", "127.0.0.1", port, "127.0.0.1", 5060),
        lambda *a: None,
        backoff=Backoff(initial=0.1, cap=5.0),
        rng=random.Random(3),
        on_state=on_state,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(conn.run)
        await trio.sleep(60)
        nursery.cancel_scope.cancel()
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert 0.05 <= gaps[0] <= 0.1  # first retry soon
    assert all(g <= 5.0 + 0.01 for g in gaps)  # never more than the cap
    assert all(g >= 2.5 for g in gaps[7:])  # once capped, never hammering
    assert 12 <= len(attempts) <= 40


async def test_a_stream_of_gaps_is_logged_once_a_second_not_once_per_gap(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="evapi_worker.service")
    service = Service(Config(evapi=EvapiSettings(sequence_grace=0.2)))
    # A tracker full of open gaps counts each new one at once (the stalled
    # worker's case): still one line a second.
    service.protocol.sequences = SequenceTracker(0.2, max_missing=10)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(service._timer)
        for i in range(500):  # every other event lost, for 5 seconds
            call = frame("call_start", T0 + i / 100, 2 * i + 1, call_id=f"c{i}", aor="bob@x", from_user="a")
            service.on_frame("kam1", call, trio.current_time())
            await trio.sleep(0.01)
        await trio.sleep(3)
        nursery.cancel_scope.cancel()
    assert service.metrics.value("evapi_worker_events_lost_total", {"node": "kam1"}) == 499
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("events lost")]
    assert 3 <= len(lines) <= 8, lines
    assert sum(int(line.split("count=")[1].split()[0]) for line in lines) == 499
