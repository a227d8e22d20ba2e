"""Decision latency under load: from a deciding event's arrival to its action starting.

    .venv/bin/python -m bench.latency --rate 20000 --seconds 5

A separate process plays Kamailio and sends the synthetic stream
(bench/events.py) at a steady rate over loopback TCP. The worker is the real
service; each action records how long after its event was read it started
(the time the worker takes to parse, decide, queue and schedule it), instead
of starting SIPp, and how long after the sender wrote the event (adding the
time the event waited in the socket, which the worker's read coalescing
lengthens under load).
"""

from __future__ import annotations

import argparse
import multiprocessing
import socket
import time
from multiprocessing.connection import Connection

import trio

from evapi_worker.config import Config
from evapi_worker.core.engine import Act
from evapi_worker.core.links import NodeAddress
from evapi_worker.core.outcomes import Outcome
from evapi_worker.runtime import tune_gc
from evapi_worker.service import Service

from .events import stream


def _kamailio(rate: int, seconds: float, ready: Connection) -> None:
    frames = stream(int(rate * seconds / 3.25) + 1)
    with socket.create_server(("127.0.0.1", 0)) as server:
        ready.send(server.getsockname()[1])
        conn, _ = server.accept()
        with conn:
            batch = max(1, rate // 1000)  # a write every millisecond
            start = time.perf_counter()
            for i in range(0, len(frames), batch):
                due = start + i / rate
                pause = due - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
                conn.sendall(b"".join(frames[i : i + batch]))
            conn.shutdown(socket.SHUT_WR)
            ready.send((start, batch))
            while conn.recv(65536):  # the worker's pings, until it hangs up
                pass


async def _worker(port: int, seconds: float) -> tuple[list[float], list[tuple[int, float]]]:
    service = Service(Config(nodes=(NodeAddress("kam1", "127.0.0.1", port, "127.0.0.1", 5060),)))
    latencies: list[float] = []
    started: list[tuple[int, float]] = []  # (the deciding event's seq, perf_counter when its action started)

    async def record(decision: Act, received: float, *, retry: bool = False) -> Outcome:
        latencies.append(trio.current_time() - received)
        started.append((decision.register.seq, time.perf_counter()))
        return Outcome.COMPLETED

    service.actions.run = record  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        await trio.sleep(seconds + 1)
        nursery.cancel_scope.cancel()
    return latencies, started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=20_000, help="events per second")
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_kamailio, args=(args.rate, args.seconds, child))
    proc.start()
    port = parent.recv()
    tune_gc()
    read_to_action, started = trio.run(_worker, port, args.seconds)
    start, batch = parent.recv()
    proc.join(10)
    # The stream numbers its events from seq 1 (events.py): an event's seq
    # gives its index, its index the moment its batch was due.
    write_to_action = []
    for seq, at in started:
        index = seq - 1
        write_to_action.append(at - (start + (index // batch * batch) / args.rate))

    def pct(values: list[float], q: float) -> float:
        values = sorted(values)
        return values[min(len(values) - 1, int(q * len(values)))] * 1000

    print(f"rate: {args.rate:,} events/s for {args.seconds:g} s; actions: {len(read_to_action):,}")
    for name, values in (("event read", read_to_action), ("event written", write_to_action)):
        print(
            f"decision latency from {name}: p50 {pct(values, 0.5):.3f} ms, p99 {pct(values, 0.99):.3f} ms, "
            f"max {max(values) * 1000:.3f} ms"
        )


if __name__ == "__main__":
    main()
