"""Pushes through the production APNs client to the APNs stand-in, over
one HTTP/2 connection on loopback.

    .venv/bin/python -m bench.push --pushes 5000 --rate 500

A separate process serves the stand-in (HTTP/2 over TLS; it checks each
push's JWT signature, headers and payload, as in the tests). The worker
side is the real Pusher with the real ApnsClient: each push is submitted
as a call's ``call_start`` would submit it, and its latency runs from the
submission to the stand-in's 200 read back. First ``--pushes`` at a steady
``--rate`` (latency), then the same number at once (pushes per second).

Target: p50 at most 5 ms on loopback, at least 1,000 pushes/s.

    .venv/bin/python -m bench.push --storm 10 --seconds 10

Fairness: another account's pushes (20 a second, one device) with nothing
else going on, then beside one account's storm of ``--storm`` calls a
second to a thousand devices each (pushes waiting in that account's queue,
32 of them at once). Target: the other account's push latency grows by a
few milliseconds at most.
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

import trio

from evapi_worker.apns import ApnsSettings
from evapi_worker.config import PushSettings
from evapi_worker.core.push_answers import PushAnswer
from evapi_worker.core.push_book import PushBook, PushJob
from evapi_worker.lab.push_standin import ApnsStandIn, make_apns_key, make_tls, serve_standin
from evapi_worker.metrics import Metrics
from evapi_worker.pusher import PushClient, Pusher, push_clients

TEAM, KEY_ID = "TEAM123456", "ABC123DEFG"


def _serve(folder: str, ready: Connection) -> None:
    ca, cert, key = make_tls(Path(folder))
    standin = ApnsStandIn(make_apns_key(Path(folder) / "AuthKey.p8"), KEY_ID, TEAM)
    standin.received = _Discard()  # type: ignore[assignment]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_standin, standin.handle, cert, key)
            ready.send((str(ca), port))

    trio.run(main)


class _Discard(list[object]):
    """Received pushes are not kept (a long run would only grow memory)."""

    def append(self, item: object) -> None:
        pass


class _Timed:
    """The production client, each answer's latency noted."""

    def __init__(self, client: PushClient) -> None:
        self.client = client
        self.latencies: list[float] = []
        self.wanted = 1
        self.done = trio.Event()

    def expect(self, count: int) -> None:
        self.latencies.clear()
        self.wanted, self.done = count, trio.Event()

    async def send(self, job: PushJob) -> PushAnswer:
        answer = await self.client.send(job)
        self.latencies.append(trio.current_time() - job.received)
        if len(self.latencies) >= self.wanted:
            self.done.set()
        return answer

    def renew_token(self) -> None:
        self.client.renew_token()

    async def aclose(self) -> None:
        await self.client.aclose()


def _job(n: int, aor: str = "") -> PushJob:
    return PushJob(
        f"bench-{n}@caller.example.net", "kam1", aor or f"user{n}@example.com", f"dev-{n}", "apns", f"{n:064x}",
        "org.linphone.phone.voip", "alice", "Alice", "example.com", time.time(), trio.current_time(),
    )  # fmt: skip


async def _fairness(ca: str, port: int, key: Path, storm: float, seconds: float) -> tuple[list[float], list[float]]:
    """Latencies of bob's pushes alone, then beside mallory's storm."""
    settings = ApnsSettings(
        key_file=key, key_id=KEY_ID, team_id=TEAM, url=f"https://127.0.0.1:{port}", ca_file=Path(ca)
    )
    client = push_clients(PushSettings(apns=settings))["apns"]
    bob: list[float] = []

    class _Bob:
        async def send(self, job: PushJob) -> PushAnswer:
            answer = await client.send(job)
            if job.aor == "bob@example.com":
                bob.append(trio.current_time() - job.received)
            return answer

        def renew_token(self) -> None:
            client.renew_token()

        async def aclose(self) -> None:
            await client.aclose()

    async def claim(node: str, key: str) -> bool:
        return True

    pusher = Pusher({"apns": _Bob()}, PushBook(), Metrics(), lambda call_id, aor: True, claim)
    n = 0

    async def bob_calls(count: int) -> None:
        nonlocal n
        for _ in range(count):
            n += 1
            pusher.submit([_job(n, "bob@example.com")])
            await trio.sleep(0.05)

    async with trio.open_nursery() as nursery:
        await nursery.start(pusher.run)
        await bob_calls(20)  # the connection made, the token signed
        bob.clear()
        await bob_calls(int(20 * seconds))
        alone = sorted(bob)
        bob.clear()

        async def mallory() -> None:
            nonlocal n
            while True:
                jobs = []
                for _ in range(1000):
                    n += 1
                    jobs.append(_job(n, "mallory@example.com"))
                pusher.submit(jobs)
                await trio.sleep(1 / storm)

        nursery.start_soon(mallory)
        await bob_calls(int(20 * seconds))
        beside = sorted(bob)
        nursery.cancel_scope.cancel()
    return alone, beside


async def _run(ca: str, port: int, key: Path, pushes: int, rate: float) -> tuple[list[float], float]:
    settings = ApnsSettings(
        key_file=key, key_id=KEY_ID, team_id=TEAM, url=f"https://127.0.0.1:{port}", ca_file=Path(ca)
    )
    timed = _Timed(push_clients(PushSettings(apns=settings))["apns"])

    async def claim(node: str, key: str) -> bool:
        return True

    metrics = Metrics()
    pusher = Pusher({"apns": timed}, PushBook(), metrics, lambda call_id, aor: True, claim, limit=100_000)
    async with trio.open_nursery() as nursery:
        await nursery.start(pusher.run)
        pusher.submit([_job(-1)])  # the connection made, the token signed
        await timed.done.wait()
        timed.expect(pushes)
        start = trio.current_time()
        for n in range(pushes):
            await trio.sleep_until(start + n / rate)
            pusher.submit([_job(n)])
        await timed.done.wait()
        steady = sorted(timed.latencies)
        timed.expect(pushes)
        burst_start = trio.current_time()
        pusher.submit([_job(pushes + n) for n in range(pushes)])
        await timed.done.wait()
        burst = pushes / (trio.current_time() - burst_start)
        sent = metrics.value("evapi_worker_pushes_total", {"provider": "apns", "result": "sent"})
        assert sent == 2 * pushes + 1, sent
        nursery.cancel_scope.cancel()
    return steady, burst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pushes", type=int, default=5000)
    parser.add_argument("--rate", type=float, default=500.0, help="pushes per second, for the latency")
    parser.add_argument("--storm", type=float, default=0.0, help="one account's calls a second (fairness)")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long the fairness run lasts")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        here, there = multiprocessing.Pipe()
        server = multiprocessing.Process(target=_serve, args=(folder, there), daemon=True)
        server.start()
        ca, port = here.recv()
        try:
            if args.storm:
                alone, beside = trio.run(_fairness, ca, port, Path(folder) / "AuthKey.p8", args.storm, args.seconds)
            else:
                steady, burst = trio.run(_run, ca, port, Path(folder) / "AuthKey.p8", args.pushes, args.rate)
        finally:
            server.terminate()
    if args.storm:
        for name, values in (("alone", alone), ("beside the storm", beside)):
            q = {p: values[min(len(values) - 1, int(p / 100 * len(values)))] * 1000 for p in (50, 90, 99)}
            print(f"another account's pushes {name}: {len(values)}, ms p50 {q[50]:.2f}  p90 {q[90]:.2f}  "
                  f"p99 {q[99]:.2f}  max {values[-1] * 1000:.2f}")  # fmt: skip
        print(f"storm: one account, {args.storm:g} calls a second to 1,000 devices each")
        return
    q = {p: steady[min(len(steady) - 1, int(p / 100 * len(steady)))] * 1000 for p in (50, 90, 99)}
    print(f"pushes: {args.pushes} at {args.rate:g}/s, then {args.pushes} at once; one HTTP/2 connection")
    print(f"latency ms: p50 {q[50]:.2f}  p90 {q[90]:.2f}  p99 {q[99]:.2f}  max {steady[-1] * 1000:.2f}")
    print(f"burst: {burst:,.0f} pushes/s")


if __name__ == "__main__":
    main()
