"""The outbox: senders never wait, one writer sends what they put, in order."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from evapi_worker.outbox import Outbox, OutboxFull


async def test_frames_put_at_once_go_out_in_order_in_one_send() -> None:
    client, server = trio.testing.memory_stream_pair()
    outbox = Outbox()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(outbox.write_to, client)
        await trio.testing.wait_all_tasks_blocked()
        for n in range(500):  # a burst of commands from 500 tasks' turns
            outbox.put(b"%d," % n)
        expected = b"".join(b"%d," % n for n in range(500))
        received = b""
        while len(received) < len(expected):
            received += await server.receive_some()
        assert received == expected
        assert outbox.sends == 1 and outbox.queued == 0
        outbox.put(b"later,")
        assert await server.receive_some() == b"later,"
        assert outbox.sends == 2
        nursery.cancel_scope.cancel()
    assert outbox.closed


async def test_put_never_waits_even_while_the_peer_reads_nothing() -> None:
    client, server = trio.testing.lockstep_stream_pair()  # a send waits for the reader
    outbox = Outbox(limit=100)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(outbox.write_to, client)
        outbox.put(b"x" * 60)
        await trio.testing.wait_all_tasks_blocked()  # the writer is stuck in send_all
        outbox.put(b"y" * 40)  # queued behind it, at once
        with pytest.raises(OutboxFull, match="40 bytes already wait"):
            outbox.put(b"z" * 61)  # 40 queued + 61 > 100 (the 60 in flight no longer count)
        assert outbox.queued == 40
        received = b""
        while len(received) < 100:
            received += await server.receive_some()
        assert received == b"x" * 60 + b"y" * 40
        nursery.cancel_scope.cancel()


async def test_a_failed_send_raises_and_closes_the_outbox() -> None:
    client, server = trio.testing.memory_stream_pair()
    await server.aclose()
    outbox = Outbox()
    outbox.put(b"lost,")
    with pytest.raises(trio.BrokenResourceError):
        await outbox.write_to(client)
    assert outbox.closed
    with pytest.raises(trio.ClosedResourceError):
        outbox.put(b"after,")


def test_one_message_larger_than_the_limit_is_taken_when_nothing_waits() -> None:
    outbox = Outbox(limit=100)
    outbox.put(b"x" * 200)
    with pytest.raises(OutboxFull):
        outbox.put(b"y")
