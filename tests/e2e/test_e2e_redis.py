"""Events through Redis, end to end: real Kamailio appending to a real
redis-server's stream (EVW_REDIS), the real worker reading it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from contextlib import AsyncExitStack
from pathlib import Path

import msgspec
import pytest
import trio

from evapi_worker.config import Config, RedisSettings
from evapi_worker.lab.demo import start_watched_worker
from evapi_worker.lab.kamailio_process import KamailioProcess
from evapi_worker.lab.phones import IPHONE_UA, Phones
from evapi_worker.lab.redis_process import RedisProcess, redis_process
from evapi_worker.redis_client import RedisAddress, open_redis
from evapi_worker.stream_source import entries_of, stream_key

from ..e2e_platform import DOMAIN, HOST, needs_platform, reading
from ..helpers import FAST_RECONNECT, needs_redis, promoted, redis_with_sentinel, running_demo
from ..process.test_hostile_process import metrics_text, sample
from ..sipp_device import SCENARIOS, free_port, free_sip_port
from ..tcp_proxy import tcp_relay
from .test_e2e_workers import address, invites, kamailio, late_iphones, missed_calls, relayed, worker_process

pytestmark = [needs_platform, needs_redis]


def redis_kamailio(folder: Path, node: str, redis_port: int) -> KamailioProcess:
    return kamailio(folder, node, f'EVW_REDIS="name=evw;addr=127.0.0.1;port={redis_port}"')


def kept_state_config(kam: KamailioProcess, url: str, state: Path) -> Config:
    """A worker reading ``kam``'s stream in Redis at ``url``, its state kept in ``state``."""
    return Config(nodes=(address(kam),), evapi=FAST_RECONNECT, redis=RedisSettings(url=url), state_file=state)


async def test_events_wait_in_redis_for_a_stopped_worker_and_none_is_read_twice(tmp_path: Path) -> None:
    async with redis_process(tmp_path) as redis:
        kam = redis_kamailio(tmp_path / "k", "r1", redis.port)
        config = kept_state_config(kam, redis.url, tmp_path / "state")
        async with kam.running():
            phones = Phones(HOST, kam.sip_port, tmp_path, DOMAIN)
            # Events come through Redis, the pin goes over evapi, its
            # acknowledgement comes back through Redis: a late iPhone gets
            # its fake call.
            async with trio.open_nursery() as nursery:
                first, _ = await start_watched_worker(nursery, config)
                await reading(first)
                # What came before it began to read (its hello's answer, say)
                # it never reads: entries are counted from where it began.
                assert first.source is not None
                with trio.fail_after(10):
                    await first.source.positioned.wait()
                start = first.source.began[kam.node]
                before = await missed_calls(phones, ["ann"], "before")
                await late_iphones(phones, ["ann"], tmp_path)
                assert invites(tmp_path / "iphone-ann.log") == [before["ann"]]
                await first.stop()
                nursery.cancel_scope.cancel()
            # No worker runs: three calls ring and are given up; their events
            # wait in the stream.
            away = await missed_calls(phones, ["bob", "cat", "dan"], "away")
            async with trio.open_nursery() as nursery:
                second, _ = await start_watched_worker(nursery, config)
                await reading(second)
                # It reads on from where the first stopped: the phone of a
                # call that ended while no worker ran gets its fake call.
                await late_iphones(phones, ["bob"], tmp_path)
                assert invites(tmp_path / "iphone-bob.log") == [away["bob"]]
                assert second.metrics.value("evapi_worker_events_lost_total", {"node": kam.node}) == 0
                assert second.metrics.value("evapi_worker_events_total", {"node": kam.node, "type": "call_start"}) >= 3
                assert first.source is not None and second.source is not None
                # Every entry read once, across the restart: none skipped,
                # none twice (counted up to where the second has read).
                read, upto = first.source.entries + second.source.entries, second.source.positions[kam.node]
                async with open_redis(RedisAddress.parse(redis.url)) as conn:
                    entries = await conn.call("XRANGE", stream_key(kam.node), f"({start}", upto)
                assert isinstance(entries, list) and read == len(entries)
                nursery.cancel_scope.cancel()


async def two_workers(
    stack: AsyncExitStack, folder: Path, kam: KamailioProcess, url: str
) -> tuple[list[trio.Process], list[int]]:
    """Two real workers reading ``kam``'s stream, and their /metrics ports."""
    ports = [free_port(socket.SOCK_STREAM) for _ in range(2)]
    procs = [
        await stack.enter_async_context(worker_process(folder, f"worker{i}", kam, f"127.0.0.1:{port}", "--redis", url))
        for i, port in enumerate(ports)
    ]
    return procs, ports


async def scrape(port: int, name: str, **labels: str) -> float:
    text = await trio.to_thread.run_sync(metrics_text, port)
    return sample(text, name, **labels)


async def heard_registers(port: int, node: str, count: float, within: float) -> None:
    """Until the worker metered at ``port`` has read ``count`` REGISTER events of ``node``."""
    with trio.fail_after(within):
        while await scrape(port, "evapi_worker_events_total", node=node, type="register") < count:
            await trio.sleep(0.2)


async def test_a_frozen_worker_holds_up_no_one_and_catches_up_without_a_second_fake_call(tmp_path: Path) -> None:
    async with redis_process(tmp_path) as redis:
        kam = redis_kamailio(tmp_path / "k", "r2", redis.port)
        async with kam.running(), AsyncExitStack() as stack:
            procs, ports = await two_workers(stack, tmp_path, kam, redis.url)
            phones = Phones(HOST, kam.sip_port, tmp_path, DOMAIN)
            call_ids = await missed_calls(phones, ["eve", "fay"], "frozen")
            os.killpg(procs[0].pid, signal.SIGSTOP)  # frozen (swapped out, stuck): it reads nothing
            try:
                # Its evapi socket fills with nothing: Kamailio writes events
                # to Redis. The other worker serves both late iPhones.
                await late_iphones(phones, ["eve", "fay"], tmp_path)
                for user in ("eve", "fay"):
                    assert invites(tmp_path / f"iphone-{user}.log") == [call_ids[user]], user
                appended = await scrape(ports[1], "evapi_worker_events_total", node=kam.node, type="register")
            finally:
                os.killpg(procs[0].pid, signal.SIGCONT)
            # Thawed, it reads on: every event, none lost, and no second
            # fake call (the node's claims were won by the other).
            await heard_registers(ports[0], kam.node, appended, within=15)
            assert await scrape(ports[0], "evapi_worker_events_lost_total", node=kam.node) == 0
            for user in ("eve", "fay"):
                assert relayed(kam, call_ids[user]) == 1, user


async def test_redis_restarted_under_calls_costs_no_event(tmp_path: Path) -> None:
    redis = RedisProcess(tmp_path)
    await redis.start()
    try:
        kam = redis_kamailio(tmp_path / "k", "r3", redis.port)
        config = Config(nodes=(address(kam),), evapi=FAST_RECONNECT, redis=RedisSettings(url=redis.url))
        async with kam.running(), trio.open_nursery() as nursery:
            worker, _ = await start_watched_worker(nursery, config)
            await reading(worker)
            phones = Phones(HOST, kam.sip_port, tmp_path, DOMAIN)
            await missed_calls(phones, ["gil"], "up")
            await redis.stop()  # Redis goes away (nothing saved: it comes back empty)
            # Calls go on meanwhile: Kamailio keeps their events (the timer
            # process holds the one Redis did not take, the queue the rest).
            down = await missed_calls(phones, ["hal", "ivy"], "down")
            await redis.start()
            with trio.fail_after(20):
                while (
                    worker.metrics.value("evapi_worker_events_total", {"node": kam.node, "type": "call_cancelled"}) < 3
                ):
                    await trio.sleep(0.1)
            assert worker.metrics.value("evapi_worker_events_lost_total", {"node": kam.node}) == 0
            assert worker.metrics.value("evapi_worker_redis_connects_total") == 2
            # The late iPhone of a call that ended while Redis was away gets its fake call.
            await late_iphones(phones, ["hal"], tmp_path)
            assert invites(tmp_path / "iphone-hal.log") == [down["hal"]]
            nursery.cancel_scope.cancel()
    finally:
        await redis.stop()


async def test_a_node_and_its_worker_follow_a_sentinel_failover(tmp_path: Path) -> None:
    # Kamailio's ndb_redis and the worker both ask the sentinel for the
    # primary; the primary stops, the sentinel promotes the replica, and
    # both follow: the late iPhone of a call made after the failover gets
    # its fake call, and no event is lost (Kamailio held them meanwhile).
    async with redis_with_sentinel(tmp_path / "redis") as (primary, replica, sentinel):
        at = f"127.0.0.1:{sentinel.port}"
        kam = kamailio(tmp_path / "k", "r5", f'EVW_REDIS="name=evw;sentinel_group=evw;sentinel_master=1;sentinel={at}"')
        settings = RedisSettings(url=primary.url, sentinels=(at,), master="evw")
        config = Config(nodes=(address(kam),), evapi=FAST_RECONNECT, redis=settings)
        async with kam.running(), trio.open_nursery() as nursery:
            worker, _ = await start_watched_worker(nursery, config)
            await reading(worker)
            phones = Phones(HOST, kam.sip_port, tmp_path, DOMAIN)
            before = await missed_calls(phones, ["kim"], "primary")
            await late_iphones(phones, ["kim"], tmp_path)
            assert invites(tmp_path / "iphone-kim.log") == [before["kim"]]
            await primary.stop()
            await promoted(replica)
            after = await missed_calls(phones, ["lee"], "promoted")
            await late_iphones(phones, ["lee"], tmp_path)
            assert invites(tmp_path / "iphone-lee.log") == [after["lee"]]
            # The node appended them to the new primary.
            async with open_redis(RedisAddress.parse(replica.url)) as conn:
                entries = await conn.call("XRANGE", stream_key(kam.node), "-", "+")
            assert isinstance(entries, list)
            appended = entries_of([[stream_key(kam.node).encode(), entries]])[0][1]
            assert any(
                isinstance(f, bytes) and msgspec.json.decode(f).get("call_id") == after["lee"] for _, f in appended
            )
            assert worker.metrics.value("evapi_worker_events_lost_total", {"node": kam.node}) == 0
            assert worker.metrics.value("evapi_worker_redis_connects_total") >= 2
            nursery.cancel_scope.cancel()


async def test_the_demo_tells_its_stories_through_redis(tmp_path: Path) -> None:
    """The installed ``evapi-worker demo --redis``: a local redis-server
    carries the events; both stories' late iPhones get the original call."""
    sip, evapi = free_sip_port(), free_port(socket.SOCK_STREAM)
    out = tmp_path / "demo.out"
    async with running_demo(
        out, "--redis", "--metrics", "off", "--sip", f"{HOST}:{sip}", "--evapi", f"{HOST}:{evapi}", ready_within=60
    ):
        text = out.read_text()
    assert "Events go through Redis (redis://127.0.0.1:" in text, text
    assert text.count("(the original call's)") == 2, text
    assert text.count("fake call outcome: completed") == 2, text
    # The redis-server the demo started ended with it.
    port = int(text.split("Events go through Redis (redis://127.0.0.1:", 1)[1].split("/", 1)[0])
    with pytest.raises(OSError, match="connect"):
        await trio.open_tcp_stream("127.0.0.1", port)


FLOOD = 25_000


async def registers_in_stream(url: str, node: str) -> int:
    """REGISTER events in the node's stream, as Redis holds them."""
    async with open_redis(RedisAddress.parse(url)) as conn:
        entries = await conn.call("XRANGE", stream_key(node), "-", "+")
    assert isinstance(entries, list)
    return sum(
        1
        for entry_id, fields in entries_of([[stream_key(node).encode(), entries]])[0][1]
        if isinstance(fields, bytes) and msgspec.json.decode(fields).get("event") == "register"
    )


async def test_a_worker_frozen_under_a_flood_of_registrations_holds_up_no_one(tmp_path: Path) -> None:
    # The story evapi alone could not tell: two workers, one frozen for 25 s
    # while 25,000 iPhones try to register; the other hears every event and serves the
    # late iPhones meanwhile; the frozen one, thawed, reads every event it
    # missed (none lost) and sends no fake call the other sent.
    async with redis_process(tmp_path) as redis:
        kam = redis_kamailio(tmp_path / "k", "r4", redis.port)
        async with kam.running(), AsyncExitStack() as stack:
            procs, ports = await two_workers(stack, tmp_path, kam, redis.url)
            phones = Phones(HOST, kam.sip_port, tmp_path, DOMAIN)
            users = [f"late{i}" for i in range(5)]
            call_ids = await missed_calls(phones, users, "flood")
            os.killpg(procs[0].pid, signal.SIGSTOP)
            frozen_at = trio.current_time()
            try:
                flood = [
                    shutil.which("sipp") or "sipp", f"{HOST}:{kam.sip_port}", "-sf",
                    str(SCENARIOS / "register_flood.xml"), "-key", "domain", DOMAIN, "-m", str(FLOOD), "-r", "5000",
                    "-l", "5000", "-i", HOST, "-p", str(free_port()), "-nostdin", "-timeout", "60s",
                ]  # fmt: skip
                with trio.move_on_after(70):
                    await trio.run_process(flood, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
                # The other worker has heard the flood and serves the late iPhones.
                await late_iphones(phones, users, tmp_path)
                for user in users:
                    assert invites(tmp_path / f"iphone-{user}.log") == [call_ids[user]], user
                # Every REGISTER event the node appended, the other worker heard.
                emitted = await registers_in_stream(redis.url, kam.node)
                assert emitted >= FLOOD // 2, emitted  # most of the flood got through (UDP, no retransmission)
                await heard_registers(ports[1], kam.node, emitted, within=30)
                # Frozen 25 s in all, as a paused VM may be.
                await trio.sleep_until(frozen_at + 25)
            finally:
                os.killpg(procs[0].pid, signal.SIGCONT)
            await heard_registers(ports[0], kam.node, emitted, within=60)
            assert await scrape(ports[0], "evapi_worker_events_lost_total", node=kam.node) == 0
            assert await scrape(ports[1], "evapi_worker_events_lost_total", node=kam.node) == 0
            for user in users:
                assert relayed(kam, call_ids[user]) == 1, user


def fake_call_nodes(log: Path) -> list[str]:
    """The nodes a worker decided fake calls through, as it logged them."""
    lines = log.read_text(errors="replace").splitlines()
    return [line.split(" node=")[1].split()[0] for line in lines if "action=fake_call" in line]


async def test_a_device_registered_on_two_nodes_at_once_gets_one_fake_call(tmp_path: Path) -> None:
    # Two nodes, two workers that each hear both, listed in the other order.
    # The iPhone registers on node one, then on node two. Worker A reads
    # them as they come and decides the fake call through node one. Worker
    # B is frozen meanwhile (long enough for its waiting read to end empty):
    # thawed, it reads both REGISTERs in one batch, node two's first (its
    # order), and decides the fake call through node two. Each node's claim
    # alone would let both through; the claim in Redis lets one.
    async with redis_process(tmp_path) as redis:
        one = redis_kamailio(tmp_path / "one", "one", redis.port)
        two = redis_kamailio(tmp_path / "two", "two", redis.port)
        async with one.running(), two.running(), AsyncExitStack() as stack:
            a = await stack.enter_async_context(worker_process(tmp_path, "a", [one, two], "off", "--redis", redis.url))
            b = await stack.enter_async_context(worker_process(tmp_path, "b", [two, one], "off", "--redis", redis.url))
            call_ids = await missed_calls(Phones(HOST, one.sip_port, tmp_path, DOMAIN), ["joy"], "twice")
            os.killpg(b.pid, signal.SIGSTOP)
            try:
                await trio.sleep(1.5)  # past its XREAD's BLOCK (1 s): its next read is sent thawed
                async with trio.open_nursery() as nursery:
                    for kam in (one, two):
                        phones = Phones(HOST, kam.sip_port, tmp_path, DOMAIN)
                        log = tmp_path / f"iphone-{kam.node}.log"
                        nursery.start_soon(phones.phone, "joy", IPHONE_UA, "iphone-joy", "phone_rings", 4000, log)
                        await kam.wait_registered(f"joy@{DOMAIN}")
                    # Registered is not yet appended (the node's timer
                    # process does that a moment later): both REGISTER
                    # events wait in the streams before B thaws.
                    with trio.fail_after(5):
                        while min([await registers_in_stream(redis.url, kam.node) for kam in (one, two)]) < 1:
                            await trio.sleep(0.01)
                    os.killpg(b.pid, signal.SIGCONT)
            finally:
                os.killpg(b.pid, signal.SIGCONT)
            assert a.returncode is None
            decided = {name: fake_call_nodes(tmp_path / f"{name}.log") for name in ("a", "b")}
            assert decided == {"a": ["one"], "b": ["two"]}, decided  # the race this test is about
            got = invites(tmp_path / "iphone-one.log") + invites(tmp_path / "iphone-two.log")
            assert got == [call_ids["joy"]], got
            assert relayed(one, call_ids["joy"]) + relayed(two, call_ids["joy"]) == 1


async def test_a_redis_link_gone_silent_is_found_and_the_late_iphone_served_within_10_s(tmp_path: Path) -> None:
    # The worker reaches Redis through a relay whose connections stop
    # forwarding (no FIN, no RST: a dead NAT entry); new connections work.
    async with redis_process(tmp_path) as redis, tcp_relay(redis.port) as relay:
        kam = redis_kamailio(tmp_path / "k", "r6", redis.port)
        settings = RedisSettings(url=f"redis://127.0.0.1:{relay.port}/0")
        config = Config(nodes=(address(kam),), evapi=FAST_RECONNECT, redis=settings)
        async with kam.running(), trio.open_nursery() as nursery:
            worker, _ = await start_watched_worker(nursery, config)
            await reading(worker)
            phones = Phones(HOST, kam.sip_port, tmp_path, DOMAIN)
            relay.freeze()
            call_ids = await missed_calls(phones, ["mia"], "silent")
            # The late iPhone stays registered 10 s: its INVITE came within them.
            await late_iphones(phones, ["mia"], tmp_path, stay_ms=10_000)
            assert invites(tmp_path / "iphone-mia.log") == [call_ids["mia"]]
            assert worker.metrics.value("evapi_worker_redis_lost_total", {"connection": "stream", "why": "silent"}) >= 1
            assert worker.source is not None and worker.source.connected
            nursery.cancel_scope.cancel()


async def test_an_entry_of_64_mib_costs_only_itself_live_and_after_a_restart_with_state(tmp_path: Path) -> None:
    async with redis_process(tmp_path) as redis:
        kam = redis_kamailio(tmp_path / "k", "r7", redis.port)
        config = kept_state_config(kam, redis.url, tmp_path / "state")
        poison = b"x" * (64 * 1024 * 1024)

        async def poisoned() -> None:
            async with open_redis(RedisAddress.parse(redis.url)) as conn:
                await conn.call("XADD", stream_key(kam.node), "*", "e", poison)

        async with kam.running():
            phones = Phones(HOST, kam.sip_port, tmp_path, DOMAIN)
            async with trio.open_nursery() as nursery:
                first, _ = await start_watched_worker(nursery, config)
                await reading(first)
                await poisoned()
                calls = await missed_calls(phones, ["ned"], "live")
                await late_iphones(phones, ["ned"], tmp_path, stay_ms=5000)
                assert invites(tmp_path / "iphone-ned.log") == [calls["ned"]]
                assert (
                    first.metrics.value("evapi_worker_event_errors_total", {"node": kam.node, "reason": "oversized"})
                    == 1
                )
                await first.stop()
                nursery.cancel_scope.cancel()
            # While no worker runs, another one comes: the next worker, from
            # the position on disk, skips it as the first did.
            await poisoned()
            calls = await missed_calls(phones, ["ola"], "restart")
            async with trio.open_nursery() as nursery:
                second, _ = await start_watched_worker(nursery, config)
                await reading(second)
                await late_iphones(phones, ["ola"], tmp_path, stay_ms=5000)
                assert invites(tmp_path / "iphone-ola.log") == [calls["ola"]]
                assert (
                    second.metrics.value("evapi_worker_event_errors_total", {"node": kam.node, "reason": "oversized"})
                    == 1
                )
                assert second.metrics.value("evapi_worker_redis_connects_total") == 1
                nursery.cancel_scope.cancel()
