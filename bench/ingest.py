"""Ingest benchmark: events/s through framing, parsing and the engine.

A separate process plays Kamailio: it listens on a loopback TCP port and
writes a pre-built event stream as fast as the socket takes it. The worker
side is the real service (connection, netstring decoder, parser, metrics,
engine, action queue); only the actions themselves are counted instead of
starting SIPp. Run with::

    .venv/bin/python -m bench.ingest --calls 100000
    .venv/bin/python -m bench.ingest --calls 100000 --state /tmp/evw-bench/state

(the second with the state journal and its snapshots on).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
from multiprocessing.connection import Connection
from pathlib import Path

import trio

from evapi_worker.config import Config, EvapiSettings
from evapi_worker.core.links import NodeAddress
from evapi_worker.runtime import tune_gc
from evapi_worker.service import Service

from .events import stream
from .timing import BatchClock


def _kamailio(calls: int, ready: Connection) -> None:
    payload = b"".join(stream(calls))
    with socket.create_server(("127.0.0.1", 0)) as server:
        ready.send((server.getsockname()[1], len(payload)))
        conn, _ = server.accept()
        with conn:
            conn.sendall(payload)
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(65536):  # the worker's pings, until it hangs up
                pass


async def _worker(port: int, events: int, state: Path | None) -> tuple[float, int, int, Service]:
    node = NodeAddress("kam1", "127.0.0.1", port, "127.0.0.1", 5060)
    # Shedding off: this measures how fast every event is decided, and the
    # sender here outruns the worker on purpose.
    config = Config(nodes=(node,), action_queue=1_000_000, evapi=EvapiSettings(shed_above=0), state_file=state)
    service = Service(config)
    clock = BatchClock(events)
    service.connections["kam1"]._on_frame = clock.timed(service.on_frame)
    service.actions.run = clock.count_action  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        await clock.done.wait()
        await trio.sleep(0.1)  # let the action tasks drain
        nursery.cancel_scope.cancel()
    return clock.elapsed, clock.seen, clock.actions, service


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--state", type=Path, help="keep the state in this file (journal and snapshots)")
    args = parser.parse_args()
    if args.state is not None:
        args.state.parent.mkdir(parents=True, exist_ok=True)
        for old in args.state.parent.glob(args.state.name + "*"):
            old.unlink()
    events = len(stream(args.calls))
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_kamailio, args=(args.calls, child))
    proc.start()
    port, size = parent.recv()
    tune_gc()  # as `evapi-worker run` does
    elapsed, seen, actions, service = trio.run(_worker, port, events, args.state)
    proc.join(10)
    rate = seen / elapsed
    print(f"cpu cores: {os.cpu_count()}, events: {seen}, bytes: {size}, fake-call decisions: {actions}")
    print(f"elapsed: {elapsed:.3f} s, rate: {rate:,.0f} events/s, {elapsed / seen * 1e6:.2f} us/event")
    print(f"tracked calls: {service.engine.call_count}, devices: {service.engine.device_count}")
    if args.state is not None:
        files = sorted(args.state.parent.glob(args.state.name + "*"))
        print("state files: " + ", ".join(f"{f.name} {f.stat().st_size / 1e6:.1f} MB" for f in files))


if __name__ == "__main__":
    main()
