"""Claims in Redis, shared by every node and worker, against a real
redis-server: one fake call for a device heard on two nodes."""

from __future__ import annotations

from pathlib import Path

import msgspec
import trio

from evapi_worker.config import Config, EvapiSettings, RedisSettings
from evapi_worker.core.links import Backoff, NodeAddress
from evapi_worker.core.outcomes import Outcome
from evapi_worker.lab.redis_process import RedisProcess, redis_process
from evapi_worker.redis_client import RedisAddress, RedisTarget
from evapi_worker.service import Service
from evapi_worker.shared_claims import ClaimResult, SharedClaims
from evapi_worker.sipp_runner import SippSettings

from ..evapi_server import EvapiServer
from ..helpers import needs_redis
from ..sipp_device import device, needs_sipp
from .test_service import T0, register, start

pytestmark = needs_redis

STAMPED_FROM_NOW = True  # T0 is set as each test starts (conftest.py)
FAST = Backoff(initial=0.02, cap=0.2)


async def connected(claims: SharedClaims) -> None:
    with trio.fail_after(5):
        while await claims.claim("probe", "bob@x", "probe", 0.001) is ClaimResult.UNAVAILABLE:
            await trio.sleep(0.02)


async def test_one_holder_wins_its_own_retry_finds_it_and_no_redis_is_no_end(tmp_path: Path) -> None:
    server = RedisProcess(tmp_path)
    await server.start()
    address = RedisTarget(RedisAddress.parse(server.url))
    a, b = SharedClaims(address, "worker-a", backoff=FAST), SharedClaims(address, "worker-b", backoff=FAST)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            await nursery.start(b.run)
            await connected(a)
            await connected(b)
            assert await a.claim("c1@x", "bob@x", "dev", 30) is ClaimResult.WON
            assert await b.claim("c1@x", "bob@x", "dev", 30) is ClaimResult.TAKEN
            assert await b.claim("c1@x", "bob@x", "other-dev", 30) is ClaimResult.WON  # another device: its own claim
            # After a crash, a worker retries what it had begun: its own claim is its own.
            assert await a.claim("c1@x", "bob@x", "dev", 30, retry=True) is ClaimResult.WON
            assert await b.claim("c1@x", "bob@x", "dev", 30, retry=True) is ClaimResult.TAKEN
            assert await a.claim("short@x", "bob@x", "dev", 0.05) is ClaimResult.WON
            await trio.sleep(0.2)
            assert await b.claim("short@x", "bob@x", "dev", 30) is ClaimResult.WON  # the first claim expired
            await server.stop()
            with trio.fail_after(5):
                while await a.claim("c2@x", "bob@x", "dev", 30) is not ClaimResult.UNAVAILABLE:
                    await trio.sleep(0.02)
            nursery.cancel_scope.cancel()
    finally:
        await server.stop()


@needs_sipp
async def test_a_device_heard_on_two_nodes_gets_one_fake_call_from_two_workers(tmp_path: Path) -> None:
    # Worker A hears the device register on node kam1, worker B on node
    # kam2, both after the call ended: each decides a fake call, and each
    # node alone would let its own through (claims are node-local). The
    # claim in Redis lets one through.
    async with (
        redis_process(tmp_path) as redis,
        device("phone_rings", tmp_path) as dev,
        trio.open_nursery() as nursery,
    ):
        workers: list[Service] = []
        servers: list[EvapiServer] = []
        for name in ("kam1", "kam2"):
            server = EvapiServer(name)
            await server.start(nursery)
            config = Config(
                nodes=(NodeAddress(name, "127.0.0.1", server.port, "127.0.0.1", dev.port),),
                sipp=SippSettings(max_concurrent=2, timeout=20),
                evapi=msgspec.structs.replace(EvapiSettings(), reconnect_initial=0.01, reconnect_max=0.05),
                redis=RedisSettings(url=redis.url),
            )
            worker = Service(config)
            await nursery.start(worker.run)
            await server.wait_for(lambda s=server: bool(s.streams))
            assert worker.shared_claims is not None
            await connected(worker.shared_claims)
            workers.append(worker)
            servers.append(server)
        for server in servers:
            await server.send(
                start(server, T0) + server.event("call_cancelled", T0 + 2, call_id="orig-call-1@10.0.0.5")
            )
        for server in servers:
            await server.send(register(server, T0 + 4))
        # Both fake calls end, one way or another (a second one would find
        # the device's one call taken).
        with trio.fail_after(30):
            while sum(w.metrics.value("evapi_worker_fake_calls_total", {"outcome": o.value})
                      for w in workers for o in Outcome) < 2:  # fmt: skip
                await trio.sleep(0.05)
        await dev.finished()
        with trio.fail_after(10):
            while not any(w.metrics.value("evapi_worker_fake_calls_total", {"outcome": "completed"}) for w in workers):
                await trio.sleep(0.02)
        pins = [c for s in servers for c in s.commands if c["cmd"] == "pin"]
        assert len(pins) == 1
        outcomes = sorted(
            o for w in workers for o in ("completed", "taken")
            if w.metrics.value("evapi_worker_fake_calls_total", {"outcome": o})
        )  # fmt: skip
        assert outcomes == ["completed", "taken"]
        nursery.cancel_scope.cancel()
