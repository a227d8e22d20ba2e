"""``/healthz`` under a flood of requests whose answers nobody reads.

    .venv/bin/python -m bench.http --seconds 5 --threads 4 --path /metrics

The worker's HTTP server (the real one, with the real metrics registry of
two nodes and Redis) serves in this process; a separate process opens
connections from ``--threads`` threads as fast as it can, each sending one
GET for ``--path`` and closing without reading the answer. Meanwhile a
health check every 100 ms records how long ``/healthz`` takes.

Target: every health check within 100 ms.

    .venv/bin/python -m bench.http flood PORT SECONDS THREADS PATH

The flood alone, against any port (the tests use it against the real
``evapi-worker run``); prints the requests sent.
"""

from __future__ import annotations

import argparse
import resource
import socket
import subprocess
import sys
import threading
import time

import trio

from evapi_worker.http_server import serve_http
from evapi_worker.metrics import Metrics


def _flood_thread(port: int, until: float, path: str, sent: list[int]) -> None:
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    count = 0
    while time.monotonic() < until:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(request)
            count += 1
        except OSError:
            time.sleep(0.001)
    sent.append(count)


def flood(port: int, seconds: float, threads: int, path: str) -> int:
    """Requests sent, as fast as ``threads`` threads can, for ``seconds``."""
    until = time.monotonic() + seconds
    sent: list[int] = []
    workers = [threading.Thread(target=_flood_thread, args=(port, until, path, sent)) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(sent)


def timed_get(port: int, path: str) -> tuple[int, float]:
    """(status, seconds) of one GET that reads its answer."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1]), time.monotonic() - started


async def measure(seconds: float, threads: int, path: str) -> None:
    metrics = Metrics()
    metrics.init_series(["k1", "k2"], redis=True)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_http, "127.0.0.1", 0, metrics.registry, lambda: (True, []))
        args = [sys.executable, "-m", "bench.http", "flood", str(port), str(seconds), str(threads), path]
        before = resource.getrusage(resource.RUSAGE_SELF)
        proc = await trio.lowlevel.open_process(args, stdout=subprocess.PIPE)
        took = []
        await trio.sleep(0.5)
        while proc.poll() is None:
            status, elapsed = await trio.to_thread.run_sync(timed_get, port, "/healthz")
            assert status == 200
            took.append(elapsed * 1000)
            await trio.sleep(0.1)
        assert proc.stdout is not None
        sent = int((await proc.stdout.receive_some()).decode())
        after = resource.getrusage(resource.RUSAGE_SELF)
        nursery.cancel_scope.cancel()
    took.sort()
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    print(f"flood: {sent} requests for {path} in {seconds:g} s ({sent / seconds:,.0f}/s), server CPU {cpu:.2f} s")
    print(
        f"/healthz x{len(took)}: p50 {took[len(took) // 2]:.1f} ms, p90 {took[int(len(took) * 0.9)]:.1f} ms, "
        f"max {took[-1]:.1f} ms"
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "flood":
        port, seconds, threads, path = int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
        print(flood(port, seconds, threads, path), flush=True)
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--path", default="/metrics")
    args = parser.parse_args()
    trio.run(measure, args.seconds, args.threads, args.path)


if __name__ == "__main__":
    main()
