"""The Redis connection against a real redis-server: pipelined replies in
order, error replies, a cancelled caller, a server that goes away."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from evapi_worker.core.resp import RedisError
from evapi_worker.lab.redis_process import redis_process
from evapi_worker.redis_client import Lost, RedisAddress, RedisUnavailable, open_redis

from ..helpers import needs_redis
from ..tcp_proxy import tcp_relay

pytestmark = needs_redis


def test_a_redis_url_names_host_port_database_and_login() -> None:
    assert RedisAddress.parse("redis://127.0.0.1:6380/2") == RedisAddress("127.0.0.1", 6380, 2)
    assert RedisAddress.parse("redis://:s%40cret@[::1]") == RedisAddress("::1", 6379, 0, None, "s@cret")
    assert str(RedisAddress.parse("redis://u:p@h:1/3")) == "redis://h:1/3"  # no password in logs
    for bad, problem in [
        ("http://h", "must start with redis://"),
        ("redis://", "names no host"),
        ("redis://h:99999", "port"),
        ("redis://h/x", "database"),
    ]:
        with pytest.raises(ValueError, match=problem):
            RedisAddress.parse(bad)


async def test_pipelined_commands_get_their_own_replies(tmp_path: Path) -> None:
    async with redis_process(tmp_path) as server, open_redis(RedisAddress.parse(server.url)) as redis:
        got: dict[int, object] = {}

        async def incr(n: int) -> None:
            got[n] = await redis.call("INCRBY", "counter", n)

        async with trio.open_nursery() as nursery:
            for n in range(1, 101):
                nursery.start_soon(incr, n)
        assert await redis.call("GET", "counter") == b"5050"
        assert sorted(got) == list(range(1, 101))
        with pytest.raises(RedisError) as err:
            await redis.call("XADD", "counter", "*", "e", "x")  # a string, not a stream
        assert err.value.code == "WRONGTYPE"
        assert await redis.call("PING") == "PONG"  # an error reply costs nothing else


async def test_a_caller_cancelled_while_waiting_leaves_the_others_their_replies(tmp_path: Path) -> None:
    async with redis_process(tmp_path) as server, open_redis(RedisAddress.parse(server.url)) as redis:
        with trio.move_on_after(0.2):
            await redis.call("BLPOP", "nothing", 1)  # blocks a second on the server
        assert await redis.call("ECHO", "after") == b"after"


async def test_a_server_that_goes_away_fails_the_waiting_calls(tmp_path: Path) -> None:
    async with redis_process(tmp_path) as server, open_redis(RedisAddress.parse(server.url)) as redis:
        async with trio.open_nursery() as nursery:
            failures: list[str] = []

            async def blocked() -> None:
                try:
                    await redis.call("BLPOP", "nothing", 0)
                except RedisUnavailable as exc:
                    failures.append(str(exc))

            nursery.start_soon(blocked)
            await trio.sleep(0.1)
            await server.stop()
        assert len(failures) == 1 and not redis.open
        with pytest.raises(RedisUnavailable):
            await redis.call("PING")


async def test_no_server_is_a_clear_error(tmp_path: Path) -> None:
    async with redis_process(tmp_path) as server:
        url = server.url
    with pytest.raises(RedisUnavailable, match="cannot connect"):
        async with open_redis(RedisAddress.parse(url)):
            pass


async def test_a_refused_login_or_database_is_a_clear_error(tmp_path: Path) -> None:
    async with redis_process(tmp_path) as server:
        for url in (f"redis://:secret@127.0.0.1:{server.port}", f"redis://127.0.0.1:{server.port}/99"):
            with pytest.raises(RedisUnavailable, match="refused the login or database"):
                async with open_redis(RedisAddress.parse(url)):
                    pass
        async with open_redis(RedisAddress.parse(f"redis://127.0.0.1:{server.port}/3")) as redis:
            assert await redis.call("PING") == "PONG"  # database 3 exists


async def test_a_link_gone_silent_fails_the_connection_within_its_timeout(tmp_path: Path) -> None:
    # No FIN, no RST: the relay stops forwarding. A reply overdue past the
    # time the server may hold it (BLOCK) and the timeout fails the
    # connection, and every call waiting on it, as silent.
    async with (
        redis_process(tmp_path) as server,
        tcp_relay(server.port) as relay,
        open_redis(RedisAddress("127.0.0.1", relay.port), timeout=0.5) as redis,
    ):
        assert await redis.call("PING") == "PONG"
        # A command the server may hold is given that long, and more.
        assert await redis.request("BLPOP", "nothing", 1, block=1).result() is None
        relay.freeze()
        started = trio.current_time()
        with pytest.raises(RedisUnavailable) as lost:
            await redis.call("PING")
        assert lost.value.lost is Lost.SILENT and not redis.open
        assert 0.5 <= trio.current_time() - started < 1.5
