"""The worker's Redis client against coredis (on Trio through anyio) and
redis-py (in a thread), on the two things the worker asks of Redis:

- reading a stream: the 325,000 events of bench.ingest, ``XREAD COUNT
  1000`` a batch, the reply decoded and nothing more done with it;
- a claim: ``SET key value NX PX 30000``, one at a time, as each fake call
  makes one (the round trip is what a late iPhone waits for).

coredis and redis-py are not the worker's dependencies: install them beside
it to compare (a client not installed is skipped)::

    .venv/bin/pip install coredis==6.9.0 redis==8.1.0
    .venv/bin/python -m bench.redis_clients
"""

from __future__ import annotations

import argparse
import importlib
import tempfile
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import trio

from evapi_worker.lab.redis_process import redis_process
from evapi_worker.redis_client import RedisAddress, open_redis
from evapi_worker.stream_source import stream_key

from .stream import _fill, _payloads

KEY = stream_key("kam1")
Run = Callable[[int, int, str], Awaitable[float]]  # (port, claims, key prefix) -> seconds


def _last_id(entries: list[Any]) -> str:
    last = entries[-1][0]
    return last.decode() if isinstance(last, bytes) else str(last)


async def ours_read(port: int, _: int, __: str) -> float:
    last = "0-0"
    async with open_redis(RedisAddress.parse(f"redis://127.0.0.1:{port}/0")) as conn:
        start = time.perf_counter()
        while (reply := await conn.call("XREAD", "COUNT", "1000", "STREAMS", KEY, last)) is not None:
            assert isinstance(reply, list) and isinstance(reply[0], list) and isinstance(reply[0][1], list)
            last = _last_id(reply[0][1])
        return time.perf_counter() - start


async def ours_claim(port: int, claims: int, prefix: str) -> float:
    async with open_redis(RedisAddress.parse(f"redis://127.0.0.1:{port}/0")) as conn:
        start = time.perf_counter()
        for i in range(claims):
            await conn.call("SET", f"{prefix}:{i}", "w1", "NX", "PX", "30000")
        return time.perf_counter() - start


async def coredis_read(port: int, _: int, __: str) -> float:
    coredis = importlib.import_module("coredis")
    last = "0-0"
    async with coredis.Redis(host="127.0.0.1", port=port) as client:
        start = time.perf_counter()
        while got := await client.xread({KEY: last}, count=1000):
            last = _last_id(next(iter(got.values())))
        return time.perf_counter() - start


async def coredis_claim(port: int, claims: int, prefix: str) -> float:
    coredis = importlib.import_module("coredis")
    async with coredis.Redis(host="127.0.0.1", port=port) as client:
        start = time.perf_counter()
        for i in range(claims):
            await client.set(f"{prefix}:{i}", "w1", condition=coredis.PureToken.NX, px=30000)
        return time.perf_counter() - start


async def redis_py_read(port: int, _: int, __: str) -> float:
    client = importlib.import_module("redis").Redis(host="127.0.0.1", port=port)
    last = "0-0"
    start = time.perf_counter()
    while got := await trio.to_thread.run_sync(partial(client.xread, count=1000), {KEY: last}):
        last = _last_id(got[0][1])
    return time.perf_counter() - start


async def redis_py_claim(port: int, claims: int, prefix: str) -> float:
    client = importlib.import_module("redis").Redis(host="127.0.0.1", port=port)
    start = time.perf_counter()
    for i in range(claims):
        await trio.to_thread.run_sync(partial(client.set, f"{prefix}:{i}", "w1", nx=True, px=30000))
    return time.perf_counter() - start


CLIENTS: list[tuple[str, str | None, Run, Run]] = [
    ("evapi-worker (resp.py)", None, ours_read, ours_claim),
    ("coredis on trio", "coredis", coredis_read, coredis_claim),
    ("redis-py in a thread", "redis", redis_py_read, redis_py_claim),
]


async def _main(calls: int, claims: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        async with redis_process(Path(folder)) as server:
            payloads = _payloads(calls)
            await trio.to_thread.run_sync(_fill, server.port, payloads)
            for round in range(rounds):
                for name, module, read, claim in CLIENTS:
                    if module is not None:
                        try:
                            version = importlib.import_module(module).__version__
                        except ImportError:
                            print(f"{name}: not installed, skipped")
                            continue
                        name = f"{name} {version}"
                    took = await read(server.port, claims, "")
                    per_claim = await claim(server.port, claims, f"{module or 'ours'}-{round}") / claims
                    print(
                        f"{name}: read {len(payloads):,} entries {len(payloads) / took:,.0f}/s "
                        f"({took / len(payloads) * 1e6:.2f} us each), claim {per_claim * 1e6:.1f} us",
                        flush=True,
                    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100_000, help="calls of bench.ingest's stream to read")
    parser.add_argument("--claims", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    trio.run(_main, args.calls, args.claims, args.rounds)


if __name__ == "__main__":
    main()
