"""Reading the nodes' Redis streams against a real redis-server: from where
the reader stopped, through a Redis restart, each entry once."""

from __future__ import annotations

from pathlib import Path

import trio

from evapi_worker.core.links import Backoff
from evapi_worker.core.resp import Reply
from evapi_worker.lab.redis_process import RedisProcess, redis_process
from evapi_worker.redis_client import Lost, RedisAddress, RedisTarget, open_redis
from evapi_worker.shared_claims import ClaimResult, SharedClaims
from evapi_worker.stream_source import StreamSource, entries_of, stream_key

from ..helpers import needs_redis, promoted, redis_with_sentinel
from ..tcp_proxy import tcp_relay

pytestmark = needs_redis

FAST = Backoff(initial=0.02, cap=0.2)


async def append(url: str, node: str, *payloads: bytes) -> list[str]:
    async with open_redis(RedisAddress.parse(url)) as redis:
        ids = [await redis.call("XADD", stream_key(node), "*", "e", payload) for payload in payloads]
    return [i.decode() for i in ids if isinstance(i, bytes)]


def test_entries_are_read_whatever_else_the_reply_holds() -> None:
    reply: Reply = [
        [b"evw:events:k1", [[b"1-0", [b"e", b"one"]], [b"1-1", [b"other", b"x"]], b"junk", [b"1-2", [b"e", b"two"]]]],
        b"not a stream",
    ]
    assert entries_of(reply) == [(b"evw:events:k1", [("1-0", b"one"), ("1-1", None), ("1-2", b"two")])]
    assert entries_of(None) == []


async def test_a_reader_reads_on_from_its_position_through_a_redis_restart(tmp_path: Path) -> None:
    server = RedisProcess(tmp_path)
    await server.start()
    got: list[tuple[str, bytes]] = []
    try:
        await append(server.url, "k1", b"before")  # written before the reader was: not read
        target = RedisTarget(RedisAddress.parse(server.url))
        source = StreamSource(
            target, ["k1", "k2"], lambda node, _id, payload, _now: got.append((node, payload)), backoff=FAST
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(source.run)
            with trio.fail_after(5):
                while len(source.positions) < 2:
                    await trio.sleep(0.01)
            await append(server.url, "k1", b"a1", b"a2")
            await append(server.url, "k2", b"b1")
            with trio.fail_after(5):
                while len(got) < 3:
                    await trio.sleep(0.01)
            await server.stop()  # Redis restarts (empty: no persistence here)
            with trio.fail_after(5):
                while source.connected:
                    await trio.sleep(0.01)
            await server.start()
            await append(server.url, "k1", b"a3")
            with trio.fail_after(10):
                while len(got) < 4:
                    await trio.sleep(0.02)
            nursery.cancel_scope.cancel()
        assert got == [("k1", b"a1"), ("k1", b"a2"), ("k2", b"b1"), ("k1", b"a3")]
        assert source.connects == 2
    finally:
        await server.stop()


async def test_the_reader_and_the_claims_follow_a_sentinel_failover(tmp_path: Path) -> None:
    got: list[bytes] = []
    async with redis_with_sentinel(tmp_path) as (primary, replica, sentinel):
        url = primary.url  # the sentinel is asked; this host is not used
        target = RedisTarget(RedisAddress.parse(url), (("127.0.0.1", sentinel.port),), "evw")
        source = StreamSource(target, ["k1"], lambda _n, _i, payload, _t: got.append(payload), backoff=FAST)
        claims = SharedClaims(target, "worker-a", backoff=FAST)
        async with trio.open_nursery() as nursery:
            await nursery.start(source.run)
            await nursery.start(claims.run)
            with trio.fail_after(5):
                while "k1" not in source.positions:
                    await trio.sleep(0.01)
            await append(url, "k1", b"before")
            with trio.fail_after(5):
                while got != [b"before"]:
                    await trio.sleep(0.01)
            assert await claims.claim("c@x", "bob@x", "d", 30) is ClaimResult.WON
            await primary.stop()  # the sentinel promotes the replica
            await promoted(replica)
            await append(replica.url, "k1", b"after")
            with trio.fail_after(15):
                while got != [b"before", b"after"]:
                    await trio.sleep(0.05)
            # Claims are made on the new primary. (One made just before the
            # failover may not have reached the replica: Redis replicates
            # after answering; docs/deploy.md says what that costs.)
            with trio.fail_after(10):
                while (result := await claims.claim("c2@x", "bob@x", "d", 30)) is ClaimResult.UNAVAILABLE:
                    await trio.sleep(0.1)
            assert result is ClaimResult.WON
            nursery.cancel_scope.cancel()


async def test_a_silent_link_is_found_and_reading_goes_on_over_a_new_one(tmp_path: Path) -> None:
    got: list[bytes] = []
    lost: list[Lost] = []
    async with redis_process(tmp_path) as server, tcp_relay(server.port) as relay:
        target = RedisTarget(RedisAddress("127.0.0.1", relay.port), timeout=0.5)
        source = StreamSource(
            target, ["k1"], lambda _n, _i, payload, _t: got.append(payload), backoff=FAST, on_lost=lost.append
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(source.run)
            with trio.fail_after(5):
                while not source.connected:
                    await trio.sleep(0.01)
            relay.freeze()  # the reader's XREAD is never answered
            await append(server.url, "k1", b"during")
            # Found within the block (1 s) and the timeout, read over a new connection.
            with trio.fail_after(3):
                while got != [b"during"]:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert lost == [Lost.SILENT] and source.connects == 2 and relay.connections == 2


async def test_an_entry_too_large_to_be_an_event_is_skipped_by_its_id(tmp_path: Path) -> None:
    got: list[bytes] = []
    skipped: list[tuple[str, int]] = []
    async with redis_process(tmp_path) as server:
        target = RedisTarget(RedisAddress.parse(server.url))
        source = StreamSource(
            target, ["k1"], lambda _n, _i, payload, _t: got.append(payload), backoff=FAST,
            on_skipped=lambda _n, entry, size, _t: skipped.append((entry, size)), max_payload=1000,
        )  # fmt: skip
        async with trio.open_nursery() as nursery:
            await nursery.start(source.run)
            with trio.fail_after(5):
                await source.positioned.wait()
            # One far past what a reply keeps, one past an event's bound, and
            # small ones around them: the small ones are read, on one connection.
            ids = await append(server.url, "k1", b"a", b"x" * (8 * 1024 * 1024), b"b", b"y" * 1001, b"c")
            with trio.fail_after(10):
                while len(got) < 3:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert got == [b"a", b"b", b"c"]
    assert skipped == [(ids[1], 8 * 1024 * 1024), (ids[3], 1001)]
    assert source.positions["k1"] == ids[4] and source.connects == 1


async def test_a_position_past_the_streams_end_reads_from_its_end(tmp_path: Path) -> None:
    # Restored from a Redis that was replaced, say: waiting for entries newer
    # than it would skip everything the node appends meanwhile.
    got: list[bytes] = []
    async with redis_process(tmp_path) as server:
        await append(server.url, "k1", b"old")
        source = StreamSource(
            RedisTarget(RedisAddress.parse(server.url)), ["k1"], lambda _n, _i, p, _t: got.append(p), backoff=FAST
        )
        source.positions["k1"] = "99999999999999-0"
        async with trio.open_nursery() as nursery:
            await nursery.start(source.run)
            with trio.fail_after(5):
                await source.positioned.wait()
            await append(server.url, "k1", b"new")
            with trio.fail_after(5):
                while got != [b"new"]:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
