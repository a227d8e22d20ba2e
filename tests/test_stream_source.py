"""Reading the nodes' Redis streams against a real redis-server: from where
the reader stopped, through a Redis restart, each entry once."""

from __future__ import annotations

from pathlib import Path

import trio

from evapi_worker.evapi_client import Backoff
from evapi_worker.redis_client import RedisAddress, RedisTarget, open_redis
from evapi_worker.redis_process import RedisProcess
from evapi_worker.resp import Reply
from evapi_worker.shared_claims import ClaimResult, SharedClaims
from evapi_worker.stream_source import StreamSource, entries_of, stream_key

from .helpers import needs_redis, promoted, redis_with_sentinel

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
