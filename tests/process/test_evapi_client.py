"""The evapi connection against an in-test evapi server on loopback."""

from __future__ import annotations

import json
import logging
import random
import socket
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing

from evapi_worker.core.commands import Ping
from evapi_worker.core.events import CommandResult, parse_event
from evapi_worker.core.links import Backoff, CommandFailed, NodeAddress
from evapi_worker.core.netstring import DEFAULT_MAX_FRAME, FramingFault, encode
from evapi_worker.evapi_client import ConnectionState, EvapiConnection

from ..evapi_server import EvapiServer
from ..sipp_device import free_port

FAST = Backoff(initial=0.01, cap=0.05)


class Recorder:
    def __init__(self) -> None:
        self.frames: list[tuple[str, bytes]] = []
        self.states: list[ConnectionState] = []
        self.framing_errors: list[str] = []
        self.oversized: list[str] = []
        self.changed = trio.Event()
        self.conn: EvapiConnection | None = None

    def on_bad_frame(self, node: str, reason: FramingFault, detail: str) -> None:
        if reason is FramingFault.OVERSIZED:
            self.oversized.append(detail)
        else:
            self.framing_errors.append(reason)
        self._kick()

    def on_frame(self, node: str, payload: bytes, now: float) -> None:
        self.frames.append((node, payload))
        parsed = parse_event(payload).event
        if isinstance(parsed, CommandResult) and self.conn is not None:
            self.conn.resolve(parsed)
        self._kick()

    def on_state(self, node: str, state: ConnectionState) -> None:
        self.states.append(state)
        self._kick()

    def _kick(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def wait_for(self, predicate: object, timeout: float = 5.0) -> None:
        assert callable(predicate)
        with trio.fail_after(timeout):
            while not predicate():
                await self.changed.wait()


async def served(
    nursery: trio.Nursery, max_frame: int = DEFAULT_MAX_FRAME
) -> tuple[EvapiServer, Recorder, EvapiConnection]:
    """An in-test node and a connection to it, both running in ``nursery``."""
    server, rec = EvapiServer(), Recorder()
    await server.start(nursery)
    conn = connection(server.port, rec, max_frame=max_frame)
    await nursery.start(conn.run)
    return server, rec, conn


def connection(port: int, rec: Recorder, backoff: Backoff = FAST, **kw: object) -> EvapiConnection:
    node = NodeAddress("kam1", "127.0.0.1", port, "127.0.0.1", 5060)
    conn = EvapiConnection(
        node,
        rec.on_frame,
        backoff=backoff,
        on_state=rec.on_state,
        on_bad_frame=rec.on_bad_frame,
        rng=random.Random(1),
        **kw,  # type: ignore[arg-type]
    )
    rec.conn = conn
    return conn


def test_backoff_grows_is_capped_and_jittered() -> None:
    b = Backoff(initial=0.1, cap=5.0)
    rng = random.Random(7)
    delays = [b.delay(n, rng) for n in range(12)]
    assert 0.05 <= delays[0] <= 0.1
    assert all(0 < d <= 5.0 for d in delays)
    assert all(d >= 2.5 for d in delays[7:])  # capped, never below half the cap
    assert len({round(d, 6) for d in delays[7:]}) > 1  # jitter spreads retries


async def test_frames_split_at_every_byte_arrive_whole_and_in_order() -> None:
    async with trio.open_nursery() as nursery:
        server, rec, _ = await served(nursery)
        await server.wait_for(lambda: server.streams)
        data = b"".join(server.event("call_answered", 1.0 + i, call_id=f"c{i}") for i in range(3))
        for i in range(len(data)):
            await server.send(data[i : i + 1])
        await rec.wait_for(lambda: len(rec.frames) == 3)
        assert [json.loads(p)["call_id"] for _, p in rec.frames] == ["c0", "c1", "c2"]
        nursery.cancel_scope.cancel()


async def test_reconnects_after_the_server_closes_and_keeps_reading() -> None:
    async with trio.open_nursery() as nursery:
        server, rec, conn = await served(nursery)
        await server.wait_for(lambda: server.accepted == 1)
        await server.drop()
        await server.wait_for(lambda: server.accepted == 2 and server.streams)
        await rec.wait_for(lambda: conn.connected)
        await server.send(server.event("call_cancelled", 2.0, call_id="after"))
        await rec.wait_for(lambda: rec.frames)
        assert conn.connects == 2
        assert ConnectionState.WAITING in rec.states
        nursery.cancel_scope.cancel()


async def test_kamailio_not_up_at_start_is_retried_until_it_is(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "evapi_worker.evapi")
    port = free_port(socket.SOCK_STREAM)
    server, rec = EvapiServer(), Recorder()
    async with trio.open_nursery() as nursery:
        conn = connection(port, rec)
        await nursery.start(conn.run)
        await rec.wait_for(lambda: rec.states.count(ConnectionState.WAITING) >= 3)
        assert not conn.connected
        assert f"is Kamailio running and is evapi listening on 127.0.0.1:{port}?" in caplog.text
        await server.start(nursery, port)
        await rec.wait_for(lambda: conn.connected)
        nursery.cancel_scope.cancel()


async def test_broken_framing_reconnects_and_oversized_frames_are_skipped() -> None:
    async with trio.open_nursery() as nursery:
        server, rec, _ = await served(nursery, max_frame=100)
        await server.wait_for(lambda: server.streams)
        await server.send(encode(b"x" * 500) + server.event("call_answered", 1.0, call_id="ok1"))
        await rec.wait_for(lambda: len(rec.frames) == 1)
        assert rec.oversized == ["500 bytes, skipped"]
        await server.send(b"12x:garbage,")
        await rec.wait_for(lambda: rec.framing_errors == ["bad_length"])
        await server.wait_for(lambda: server.accepted == 2 and server.streams)
        await server.send(server.event("call_answered", 2.0, call_id="ok2"))
        await rec.wait_for(lambda: len(rec.frames) == 2)
        nursery.cancel_scope.cancel()


async def test_command_is_one_write_and_waits_for_its_ack() -> None:
    async with trio.open_nursery() as nursery:
        server, rec, conn = await served(nursery)
        await rec.wait_for(lambda: conn.connected)
        result = await conn.send_command(Ping(), timeout=2)
        assert result.ok
        # A hello first on each connection, then the command.
        assert [c["cmd"] for c in server.commands] == ["hello", "ping"]
        assert server.commands[1] == {"cmd": "ping", "id": result.id}
        assert server.reads[-1].endswith(b",") and server.reads[-1].count(b":") >= 1
        nursery.cancel_scope.cancel()


async def test_command_refused_unanswered_or_disconnected() -> None:
    server, rec = EvapiServer(ack_ok=False), Recorder()
    async with trio.open_nursery() as nursery:
        await server.start(nursery)
        conn = connection(server.port, rec)
        with pytest.raises(CommandFailed, match="not_connected"):
            await conn.send_command(Ping(id="x"), timeout=1)
        await nursery.start(conn.run)
        await rec.wait_for(lambda: conn.connected)
        with pytest.raises(CommandFailed, match="refused"):
            await conn.send_command(Ping(), timeout=2)
        server.auto_ack = False
        with pytest.raises(CommandFailed, match="timeout"):
            await conn.send_command(Ping(), timeout=0.2)

        async def drop_soon() -> None:
            await server.wait_for(lambda: len(server.requests) == 3)
            await server.drop()

        nursery.start_soon(drop_soon)
        with pytest.raises(CommandFailed, match="disconnected"):
            await conn.send_command(Ping(), timeout=5)
        nursery.cancel_scope.cancel()


async def test_an_answer_that_came_while_the_worker_was_stopped_is_not_a_timeout(
    mock_clock: trio.testing.MockClock,
) -> None:
    # Stopped (SIGSTOP) with a pin in flight: on waking, the deadline has
    # long passed and the answer waits unread. The command is answered; a
    # node that really does not answer still times out.
    server, rec = EvapiServer(auto_ack=False), Recorder()
    async with trio.open_nursery() as nursery:
        await server.start(nursery)
        conn = connection(server.port, rec)
        await nursery.start(conn.run)
        await rec.wait_for(lambda: conn.connected)
        results: list[CommandResult | CommandFailed] = []

        async def send() -> None:
            try:
                results.append(await conn.send_command(Ping(id="p1"), timeout=2))
            except CommandFailed as exc:
                results.append(exc)

        nursery.start_soon(send)
        await server.wait_for(lambda: len(server.requests) == 1)
        mock_clock.jump(25)  # the worker was stopped this long
        await trio.testing.wait_all_tasks_blocked()
        assert results == []  # still waiting: the worker, not the node, was away
        await server.ack("p1")
        await rec.wait_for(lambda: rec.frames)
        await trio.testing.wait_all_tasks_blocked()
        assert len(results) == 1 and isinstance(results[0], CommandResult) and results[0].ok
        nursery.start_soon(send)
        await server.wait_for(lambda: len(server.requests) == 2)
        await trio.testing.wait_all_tasks_blocked()
        mock_clock.jump(2)  # on time, and nothing came
        await trio.testing.wait_all_tasks_blocked()
        assert len(results) == 2 and isinstance(results[1], CommandFailed) and results[1].reason == "timeout"
        # A worker late at every deadline (starved without end) still gives
        # up, after a few: a dead node is not waited for forever.
        nursery.start_soon(send)
        await server.wait_for(lambda: len(server.requests) == 3)
        for _ in range(4):
            await trio.testing.wait_all_tasks_blocked()
            mock_clock.jump(10)
        await trio.testing.wait_all_tasks_blocked()
        assert len(results) == 3 and isinstance(results[2], CommandFailed) and results[2].reason == "timeout"
        nursery.cancel_scope.cancel()


async def test_a_command_too_large_for_evapi_is_a_failed_command() -> None:
    async with trio.open_nursery() as nursery:
        server, rec, conn = await served(nursery)
        await rec.wait_for(lambda: conn.connected)
        with pytest.raises(CommandFailed, match="too_large") as failed:
            await conn.send_command(Ping(id="x" * 9000), timeout=1)
        assert failed.value.reason == "too_large"
        assert server.requests == []  # nothing reached Kamailio
        nursery.cancel_scope.cancel()


@dataclass(frozen=True)
class CountingBackoff(Backoff):
    """A backoff that notes the attempt number of every delay asked of it."""

    attempts: list[int] = field(default_factory=list)

    def delay(self, attempt: int, rng: random.Random) -> float:
        self.attempts.append(attempt)
        return super().delay(attempt, rng)


async def test_after_a_working_connection_drops_the_retry_comes_at_once() -> None:
    # Backed off to a second or more while Kamailio was down; then it is up,
    # talks, and drops again: the worker is back after the first, shortest
    # delay, not after the long backoff (events sent meanwhile would be lost).
    port = free_port(socket.SOCK_STREAM)
    server, rec = EvapiServer(), Recorder()
    backoff = CountingBackoff(initial=0.1, cap=2.0)
    conn = connection(port, rec, backoff=backoff)
    async with trio.open_nursery() as nursery:
        await nursery.start(conn.run)
        await trio.sleep(1.6)  # refused a few times: the backoff grew
        await server.start(nursery, port)
        await server.wait_for(lambda: server.accepted == 1, timeout=5)
        await server.send(server.event("call_answered", 1.0, call_id="c"))
        await rec.wait_for(lambda: len(rec.frames) == 1)
        grown = max(backoff.attempts)
        await server.drop()
        await server.wait_for(lambda: server.accepted == 2, timeout=5)
        nursery.cancel_scope.cancel()
    assert grown >= 2  # refused a few times: the delays grew
    assert backoff.attempts[-1] == 0  # after the working connection: the first delay again
