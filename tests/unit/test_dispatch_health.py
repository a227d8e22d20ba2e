"""The service's parts on their own: decision dispatch, node liveness."""

from __future__ import annotations

from typing import Any, cast

import trio
import trio.testing

from evapi_worker.core.commands import Command
from evapi_worker.core.engine import Act, Decision, Engine, EngineSettings, Strategy
from evapi_worker.core.events import CommandResult
from evapi_worker.core.links import NodeAddress
from evapi_worker.core.outcomes import Outcome
from evapi_worker.dispatch import Dispatcher
from evapi_worker.evapi_client import ConnectionState, EvapiConnection
from evapi_worker.fake_calls import ActionRunner
from evapi_worker.health import Liveness
from evapi_worker.metrics import Metrics

from ..helpers import Wire

T0 = 1_700_000_000.0
STAMPED_FROM_NOW = True  # T0 is set as each test starts (conftest.py)


class Runner:
    """Stands in for ActionRunner: records what it was asked to run."""

    def __init__(self, hold: bool = False) -> None:
        self.ran: list[Act] = []
        self.deferred: list[Act] = []
        self.hold = hold

    def defer(self, act: Act) -> None:
        self.deferred.append(act)

    async def run(self, act: Act, received: float, *, retry: bool = False) -> Outcome:
        self.ran.append(act)
        if self.hold:
            await trio.sleep_forever()
        return Outcome.COMPLETED


def late_iphones(count: int, strategy: Strategy = Strategy.FAKE_CALL) -> list[Decision]:
    w, e = Wire(), Engine(EngineSettings(strategy=strategy))
    e.handle(w.start(T0), 0.0)
    e.handle(w.answered(T0 + 1), 1.0)
    out: list[Decision] = []
    for i in range(count):
        out += e.handle(w.register(T0 + 2, instance=f"<urn:uuid:{i}>"), 2.0)
    out += e.handle(w.register(T0 + 3, instance="<urn:uuid:0>"), 3.0)  # the first again: nothing to do
    return out


async def test_decisions_are_counted_and_acts_run() -> None:
    runner = Runner()
    m = Metrics()
    dispatcher = Dispatcher(cast(ActionRunner, runner), {}, m, limit=10)
    seen: list[Decision] = []
    dispatcher.listeners.append(seen.append)
    decisions = late_iphones(2)
    async with trio.open_nursery() as nursery:
        dispatcher.open(nursery)
        dispatcher.dispatch(decisions, 2.0)
    assert len(seen) == 3
    assert sorted(a.device for a in runner.ran) == ["urn:uuid:0", "urn:uuid:1"]
    assert m.value("evapi_worker_decisions_total", {"action": "fake_call", "reason": "answered"}) == 2
    assert m.value("evapi_worker_decisions_total", {"action": "none", "reason": "duplicate"}) == 1


async def test_past_the_limit_actions_are_dropped_and_counted() -> None:
    runner = Runner(hold=True)
    m = Metrics()
    dispatcher = Dispatcher(cast(ActionRunner, runner), {}, m, limit=2)
    async with trio.open_nursery() as nursery:
        dispatcher.open(nursery)
        dispatcher.dispatch(late_iphones(5), 2.0)
        await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert len(runner.ran) == 2
    assert m.value("evapi_worker_dispatch_dropped_total") == 3
    assert m.value("evapi_worker_fake_calls_total", {"outcome": "overdue"}) == 3


async def test_after_close_no_action_starts_and_each_is_deferred() -> None:
    runner = Runner()
    dispatcher = Dispatcher(cast(ActionRunner, runner), {}, Metrics(), limit=10)
    decisions = late_iphones(2)
    async with trio.open_nursery() as nursery:
        dispatcher.open(nursery)
        dispatcher.close()
        dispatcher.dispatch(decisions, 2.0)
    assert runner.ran == []
    assert runner.deferred == [d for d in decisions if isinstance(d, Act)] and len(runner.deferred) == 2


async def test_dropped_messages_are_counted_as_messages_not_fake_calls() -> None:
    m = Metrics()
    dispatcher = Dispatcher(cast(ActionRunner, Runner(hold=True)), {}, m, limit=1)
    async with trio.open_nursery() as nursery:
        dispatcher.open(nursery)
        dispatcher.dispatch(late_iphones(3, Strategy.MESSAGE), 2.0)
        await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert m.value("evapi_worker_messages_total", {"outcome": "overdue"}) == 2
    assert m.value("evapi_worker_fake_calls_total", {"outcome": "overdue"}) == 0


class Connection:
    """Stands in for an EvapiConnection's state."""

    def __init__(self) -> None:
        self.connected = False
        self.connects = 0
        self.node = NodeAddress("kam1", "127.0.0.1", 8448, "127.0.0.1", 5060)

    async def wait_connected(self) -> None:
        pass

    async def wait_disconnected(self) -> None:
        await trio.sleep_forever()


def test_a_node_is_healthy_only_connected_and_answering() -> None:
    conn = Connection()
    m = Metrics()
    liveness = Liveness({"kam1": cast(EvapiConnection, conn)}, cast(Any, None), m, ping_interval=5)
    assert liveness.healthy() == (False, ["kam1"])
    conn.connected, conn.connects = True, 1
    liveness.on_state("kam1", ConnectionState.CONNECTED)
    assert liveness.healthy() == (False, ["kam1"])  # connected, no ping answered yet
    liveness.set_alive("kam1", True)
    assert liveness.healthy() == (True, [])
    assert m.value("evapi_worker_kamailio_up", {"node": "kam1"}) == 1
    conn.connected = False
    liveness.on_state("kam1", ConnectionState.WAITING)
    assert liveness.healthy() == (False, ["kam1"])
    assert m.value("evapi_worker_kamailio_up", {"node": "kam1"}) == 0
    conn.connected, conn.connects = True, 2
    liveness.on_state("kam1", ConnectionState.CONNECTED)
    assert m.value("evapi_worker_reconnects_total", {"node": "kam1"}) == 1


async def test_with_answers_through_a_stream_the_first_ping_waits_for_the_reader(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # With [redis] the answer comes through the node's stream; a reader with
    # no position yet starts at the stream's end, and a ping answered before
    # it would be answered unread (the node seen down for a whole timeout).
    conn, positioned, pinged = Connection(), trio.Event(), trio.Event()
    conn.connected, conn.connects = True, 1

    async def send_command(node: str, command: Command) -> CommandResult:
        pinged.set()
        return CommandResult(node=node, ts=1.0, seq=1, boot=1, id=command.id or "p1", ok=True)

    liveness = Liveness(
        {"kam1": cast(EvapiConnection, conn)}, send_command, Metrics(), ping_interval=5, answers_read=positioned
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(liveness.watch, cast(EvapiConnection, conn))
        await trio.sleep(30)
        assert not pinged.is_set()
        positioned.set()
        await trio.testing.wait_all_tasks_blocked()
        assert pinged.is_set() and liveness.healthy() == (True, [])
        nursery.cancel_scope.cancel()


def test_without_pings_up_follows_the_connection() -> None:
    conn = Connection()
    liveness = Liveness({"kam1": cast(EvapiConnection, conn)}, cast(Any, None), Metrics(), ping_interval=0)
    conn.connected, conn.connects = True, 1
    liveness.on_state("kam1", ConnectionState.CONNECTED)
    assert liveness.healthy() == (True, [])
