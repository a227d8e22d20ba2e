"""A frozen worker must never stall Kamailio. The worker (a real process) is
stopped with SIGSTOP, as a VM pause or a debugger would; tens of thousands of
iPhones register meanwhile; Kamailio keeps answering SIP at once. After
SIGCONT the worker reports the events it lost and serves the next late
iPhone."""

from __future__ import annotations

import math
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import trio

from evapi_worker.lab.kamailio_process import KamailioProcess
from evapi_worker.lab.phones import IPHONE_UA, Phones

from ..e2e_platform import DOMAIN, HOST, needs_platform
from ..sipp_device import SCENARIOS, free_port
from .test_e2e_workers import invites, kamailio, missed_calls, worker_process

pytestmark = needs_platform

FLOOD = 30_000
QUEUE = 5_000


async def options_rtt(target: tuple[str, int]) -> tuple[float, int]:
    """Ask Kamailio with one OPTIONS over UDP, retransmitted every 500 ms as
    RFC 3261 has it (under a flood a datagram may be lost in the kernel's
    buffer, which is not Kamailio waiting): (seconds from the last send to
    the answer, sends). (inf, 4) when four sends got no answer."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        await sock.bind((HOST, 0))
        port = sock.getsockname()[1]
        branch = f"z9hG4bK-probe-{time.monotonic_ns()}"
        request = (
            f"OPTIONS sip:{target[0]}:{target[1]} SIP/2.0\r\nVia: SIP/2.0/UDP {HOST}:{port};branch={branch}\r\n"
            f"From: <sip:probe@{DOMAIN}>;tag=p\r\nTo: <sip:{target[0]}:{target[1]}>\r\nCall-ID: {branch}\r\n"
            "CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
        ).encode()
        for sends in range(1, 5):
            start = trio.current_time()
            await sock.sendto(request, target)
            with trio.move_on_after(0.5):
                await sock.recv(65536)
                return trio.current_time() - start, sends
        return math.inf, 4


async def kamcmd(kam: KamailioProcess, *args: str) -> str:
    result = await trio.run_process(["kamcmd", "-s", kam.control, *args], capture_stdout=True, check=False)
    return result.stdout.decode()


async def dropped_on(kam: KamailioProcess) -> int:
    """Events the node's queue dropped, as an operator reads it."""
    return int((await kamcmd(kam, "htable.get", "evw", "dropped")).split("value: ")[1].split()[0])


async def metrics_lines(port: int) -> list[str]:
    """The lines of a worker's /metrics, as Prometheus reads them."""
    stream = await trio.open_tcp_stream(HOST, port)
    async with stream:
        await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    return data.decode().splitlines()


async def metric(port: int, name: str) -> float:
    """Sum of a metric's samples on a worker's /metrics."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in await metrics_lines(port)
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


async def test_a_frozen_worker_never_stalls_kamailio(tmp_path: Path) -> None:
    # A queue smaller than the flood: the oldest events are dropped.
    kam = kamailio(tmp_path / "k", "stall", f"EVW_QUEUE_SIZE={QUEUE}")
    metrics_port = free_port(socket.SOCK_STREAM)
    target = (HOST, kam.sip_port)
    async with kam.running(), worker_process(tmp_path, "worker", kam, f"{HOST}:{metrics_port}") as worker:
        assert (await options_rtt(target))[0] < 0.2
        os.killpg(worker.pid, signal.SIGSTOP)
        flood = [
            shutil.which("sipp") or "sipp", f"{HOST}:{kam.sip_port}", "-sf", str(SCENARIOS / "register_flood.xml"),
            "-key", "domain", DOMAIN, "-m", str(FLOOD), "-r", "10000", "-l", "5000", "-i", HOST,
            "-p", str(free_port()), "-nostdin", "-timeout", "30s",
        ]  # fmt: skip
        probes: list[tuple[float, int]] = []
        async with trio.open_nursery() as nursery:
            done = trio.Event()

            async def run_flood() -> None:
                with trio.move_on_after(40):
                    await trio.run_process(flood, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
                done.set()

            nursery.start_soon(run_flood)
            while not done.is_set():
                probes.append(await options_rtt(target))
                await trio.sleep(0.1)
        # Every probe answered, within 200 ms of its last send; a retransmission
        # now and then is a datagram the flood crowded out, not a stall.
        assert len(probes) >= 10, probes
        worst = max(rtt for rtt, _ in probes)
        assert worst < 0.2, f"OPTIONS answered in up to {worst:.3f} s while the worker was frozen: {probes}"
        assert sum(sends > 1 for _, sends in probes) <= len(probes) // 10, probes
        # Kamailio counted what it dropped...
        dropped = await dropped_on(kam)
        assert dropped > 0, dropped
        os.killpg(worker.pid, signal.SIGCONT)
        # ...and the worker counts them lost, from the gap in the sequence.
        # (The node's count is close, not exact: SIP workers check the queue's
        # size and add to it without a common lock; a few more drop while the
        # queue drains, the worker's own acknowledgements among them.)
        with trio.fail_after(20):
            while await metric(metrics_port, "evapi_worker_events_lost_total") < 0.99 * dropped:
                await trio.sleep(0.2)
        await trio.sleep(1.0)
        lost = await metric(metrics_port, "evapi_worker_events_lost_total")
        assert lost <= 1.01 * await dropped_on(kam) + 10, (lost, dropped)
        # And it serves the next late iPhone.
        phones = Phones(HOST, kam.sip_port, tmp_path, DOMAIN)
        (call_id,) = (await missed_calls(phones, ["after"], "stall")).values()
        log = tmp_path / "iphone-after.log"
        await phones.phone("after", IPHONE_UA, "iphone-after", "phone_rings", 2500, log)
        assert invites(log) == [call_id]
