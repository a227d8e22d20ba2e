"""Events from a Redis stream against events from evapi: batch ingest and
trickle latency.

    .venv/bin/python -m bench.stream --calls 100000
    .venv/bin/python -m bench.stream --rate 20000 --seconds 5

Batch: the synthetic stream (bench/events.py) is appended to a real
redis-server's stream ``evw:events:kam1`` first (redis-cli --pipe), then
the real service reads it all with ``[redis]``; the clock runs from the
first entry handed over to the last. Compare with bench.ingest (the same
events over evapi's socket).

Trickle: a separate process appends the stream at a steady rate (a
pipelined batch of XADDs every millisecond, each event stamped as it is
written), while the worker reads; each decided action records how long
after its event was written it started. Compare with bench.latency ("from
event written"). Actions are counted, not run.
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import socket
import subprocess
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

import trio

from evapi_worker.config import Config, RedisSettings
from evapi_worker.core.engine import Act
from evapi_worker.core.links import NodeAddress
from evapi_worker.core.outcomes import Outcome
from evapi_worker.core.resp import encode_command
from evapi_worker.lab.redis_process import RedisProcess
from evapi_worker.net import free_port
from evapi_worker.runtime import tune_gc
from evapi_worker.service import Service
from evapi_worker.stream_source import stream_key

from .events import stream
from .timing import BatchClock


def _payloads(calls: int, start: float | None = None) -> list[bytes]:
    """The stream's events, without their netstring framing."""
    return [frame[frame.index(b":") + 1 : -1] for frame in stream(calls, start=start)]


def _fill(port: int, payloads: list[bytes]) -> None:
    commands = b"".join(encode_command("XADD", stream_key("kam1"), "*", "e", p) for p in payloads)
    binary = shutil.which("redis-cli") or "redis-cli"
    subprocess.run([binary, "-p", str(port), "--pipe"], input=commands, check=True, capture_output=True)


def _service(redis_url: str) -> Service:
    # No Kamailio: the node's evapi port is closed (commands are not sent:
    # actions are counted instead).
    node = NodeAddress("kam1", "127.0.0.1", free_port("127.0.0.1", socket.SOCK_STREAM), "127.0.0.1", 5060)
    return Service(Config(nodes=(node,), action_queue=1_000_000, redis=RedisSettings(url=redis_url), metrics=None))


async def _batch(redis_url: str, events: int) -> tuple[float, int]:
    service = _service(redis_url)
    clock = BatchClock(events)
    service.actions.run = clock.count_action  # type: ignore[method-assign]
    assert service.source is not None
    service.source._on_entry = clock.timed(service.on_entry)
    service.source.positions["kam1"] = "0-0"  # from the stream's start
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        await clock.done.wait()
        nursery.cancel_scope.cancel()
    return clock.elapsed, clock.actions


def _stampable(payloads: list[bytes]) -> list[tuple[bytes, bytes]]:
    """Each payload cut around its timestamp's value, to stamp it as written."""
    out = []
    for payload in payloads:
        start = payload.index(b'"ts":"') + 6
        end = payload.index(b'"', start)
        out.append((payload[:start], payload[end:]))
    return out


def _writer(port: int, rate: int, seconds: float, ready: Connection) -> None:
    frames = int(rate * seconds)
    parts = _stampable(_payloads(frames // 3 + 1, start=0.0))[:frames]
    batch = max(1, rate // 1000)  # a write every millisecond
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ready.send("ready")
        ready.recv()  # the worker reads
        start = time.perf_counter()
        sent = 0
        reader = sock.makefile("rb")
        while sent < frames:
            due = start + sent / rate
            pause = due - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            count = min(batch, frames - sent)
            # Stamped as written: the worker's latency counts from here.
            stamp = b"%.6f" % time.time()
            chunk = b"".join(
                encode_command("XADD", stream_key("kam1"), "*", "e", head + stamp + tail)
                for head, tail in parts[sent : sent + count]
            )
            sock.sendall(chunk)
            for _ in range(count):
                reader.readline()  # each XADD's id
            sent += count
    ready.send(sent)


async def _trickle(redis_url: str, port: int, rate: int, seconds: float) -> list[float]:
    service = _service(redis_url)
    latencies: list[float] = []

    async def record(decision: Act, received: float, *, retry: bool = False) -> Outcome:
        latencies.append(time.time() - decision.register.ts)
        return Outcome.COMPLETED

    service.actions.run = record  # type: ignore[method-assign]
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_writer, args=(port, rate, seconds, child))
    proc.start()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            assert service.source is not None
            with trio.fail_after(10):
                while not service.source.connected or "kam1" not in service.source.positions:  # noqa: ASYNC110
                    await trio.sleep(0.01)
            await trio.to_thread.run_sync(parent.recv)
            parent.send("go")
            await trio.to_thread.run_sync(parent.recv)
            await trio.sleep(1)
            nursery.cancel_scope.cancel()
    finally:
        proc.join(10)
    return latencies


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def _main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="evw-bench-") as folder:
        redis = RedisProcess(Path(folder))
        await redis.start()
        try:
            if args.rate:
                latencies = await _trickle(redis.url, redis.port, args.rate, args.seconds)
                print(f"trickle: {args.rate:,} events/s for {args.seconds:g} s; actions: {len(latencies):,}")
                print(
                    f"decision latency from event written: p50 {_pct(latencies, 0.5):.3f} ms, "
                    f"p99 {_pct(latencies, 0.99):.3f} ms, max {max(latencies) * 1000:.3f} ms"
                )
            else:
                payloads = _payloads(args.calls)
                await trio.to_thread.run_sync(_fill, redis.port, payloads)
                elapsed, actions = await _batch(redis.url, len(payloads))
                print(f"batch: events: {len(payloads):,}, fake-call decisions: {actions:,}")
                print(f"elapsed: {elapsed:.3f} s, rate: {len(payloads) / elapsed:,.0f} events/s")
        finally:
            await redis.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100_000, help="batch: calls in the stream (~3.25 events each)")
    parser.add_argument("--rate", type=int, default=0, help="trickle: events per second (0: the batch run)")
    parser.add_argument("--seconds", type=float, default=5.0, help="trickle: for how long")
    args = parser.parse_args()
    tune_gc()
    trio.run(_main, args)


if __name__ == "__main__":
    main()
