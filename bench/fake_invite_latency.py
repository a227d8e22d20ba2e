"""Late REGISTER -> fake INVITE at the device: evapi-worker against the baseline.

    .venv/bin/python -m bench.fake_invite_latency --calls 15 --burst 20

Both run on the same machine with real Kamailio and SIPp phones and callers:

* worker: the bundled kamailio.cfg and evapi-worker (pin, then SIPp);
* baseline: bench/seed/, the approach this project started from (htable
  call state, exec_msg running a launcher script that writes a CSV and starts
  SIPp at its default call rate).

For each call a desk phone answers, then a probe iPhone (a small UDP SIP
endpoint in this file) registers and times its REGISTER leaving to the fake
INVITE arriving. Then a burst: as many calls at once, then as many iPhones
registering together.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import socket
import statistics
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from evapi_worker.config import Config
from evapi_worker.core.links import NodeAddress
from evapi_worker.lab.demo import start_watched_worker
from evapi_worker.lab.kamailio_process import KamailioProcess
from evapi_worker.lab.phones import DESK_UA, IPHONE_UA, Phones
from evapi_worker.net import free_port

HOST = "127.0.0.1"
SEED = Path(__file__).parent / "seed"


def _header(msg: str, name: str) -> str:
    m = re.search(rf"^{name}:\s*(.*)$", msg, re.MULTILINE | re.IGNORECASE)
    return m.group(1).strip() if m else ""


def _reply(request: str, code: str, to_tag: str) -> bytes:
    vias = "\r\n".join(line for line in request.split("\r\n") if line.lower().startswith("via:"))
    to = _header(request, "To")
    if ";tag=" not in to:
        to += f";tag={to_tag}"
    lines = [
        f"SIP/2.0 {code}", vias, f"From: {_header(request, 'From')}", f"To: {to}",
        f"Call-ID: {_header(request, 'Call-ID')}", f"CSeq: {_header(request, 'CSeq')}",
        f"Contact: <sip:iphone@{HOST}>", "Content-Length: 0", "", "",
    ]  # fmt: skip
    return "\r\n".join(lines).encode()


async def iphone(user: str, sip_port: int, timeout: float = 10.0) -> float | None:
    """Register as a LinphoneiOS device; seconds from REGISTER sent to INVITE received."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await sock.bind((HOST, 0))
    port = sock.getsockname()[1]
    tag = secrets.token_hex(4)
    register = (
        f"REGISTER sip:{HOST} SIP/2.0\r\nVia: SIP/2.0/UDP {HOST}:{port};branch=z9hG4bK-{tag}\r\n"
        f"From: <sip:{user}@{HOST}>;tag={tag}\r\nTo: <sip:{user}@{HOST}>\r\nCall-ID: reg-{tag}@{HOST}\r\n"
        f'CSeq: 1 REGISTER\r\nContact: <sip:{user}@{HOST}:{port}>;+sip.instance="<urn:uuid:{user}-{tag}>"\r\n'
        f"User-Agent: {IPHONE_UA}\r\nExpires: 600\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    )
    invite: str | None = None
    delay = None
    with sock, trio.move_on_after(timeout):
        sent = trio.current_time()
        await sock.sendto(register.encode(), (HOST, sip_port))
        while True:
            data, addr = await sock.recvfrom(65536)
            msg = data.decode(errors="replace")
            if msg.startswith("INVITE "):
                if delay is None:
                    delay = trio.current_time() - sent
                invite = msg
                await sock.sendto(_reply(msg, "180 Ringing", tag), addr)
            elif msg.startswith("CANCEL ") and invite is not None:
                await sock.sendto(_reply(msg, "200 OK", tag), addr)
                await sock.sendto(_reply(invite, "487 Request Terminated", tag), addr)
            elif msg.startswith("ACK "):
                break
    return delay


@asynccontextmanager
async def worker_platform(folder: Path) -> AsyncIterator[int]:
    sip_port, evapi_port = free_port(HOST, socket.SOCK_DGRAM), free_port(HOST, socket.SOCK_STREAM)
    kam = KamailioProcess(HOST, sip_port, HOST, evapi_port, "bench", HOST, folder)
    config = Config(nodes=(NodeAddress("bench", HOST, evapi_port, HOST, sip_port),))
    async with kam.running(), trio.open_nursery() as nursery:
        await start_watched_worker(nursery, config)
        yield sip_port
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def seed_platform(folder: Path) -> AsyncIterator[int]:
    sip_port = free_port(HOST, socket.SOCK_DGRAM)
    args = [
        "kamailio", "-f", str(SEED / "kamailio.cfg"), "-DD", "-E", "-Y", str(folder), "-P", str(folder / "k.pid"),
        "-w", str(folder), "-A", f"SEED_SIP_PORT={sip_port}", "-A", f'SEED_LAUNCHER="{SEED / "launch_sipp.sh"}"',
    ]  # fmt: skip
    env = {**os.environ, "SEED_SIP_PORT": str(sip_port)}
    with (folder / "kamailio.log").open("wb") as log:
        proc = await trio.lowlevel.open_process(args, stdout=log, stderr=log, env=env, start_new_session=True)
    try:
        await trio.sleep(1.5)  # no evapi to poll: give it time to bind
        yield sip_port
    finally:
        os.killpg(proc.pid, 15)
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await proc.wait()


async def measure(platform: Callable[[Path], object], calls: int, burst: int) -> tuple[list[float], list[float]]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        async with platform(folder) as sip_port:  # type: ignore[attr-defined]
            phones = Phones(HOST, sip_port, folder)
            sequential: list[float] = []
            for n in range(calls):
                user = f"seq{n}"
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(
                        phones.phone, user, DESK_UA, f"desk-{user}", "phone_answers", 3500, folder / "d.log"
                    )
                    await trio.sleep(0.3)
                    await phones.call("alice", "Alice", user, f"{user}-{secrets.token_hex(4)}@{HOST}")
                    delay = await iphone(user, sip_port)
                    if delay is not None:
                        sequential.append(delay)
            burst_delays: list[float | None] = []
            async with trio.open_nursery() as nursery:
                users = [f"burst{n}" for n in range(burst)]
                for user in users:
                    nursery.start_soon(
                        phones.phone, user, DESK_UA, f"desk-{user}", "phone_answers", 6000, folder / "d.log"
                    )
                await trio.sleep(0.5)
                async with trio.open_nursery() as callers:
                    for user in users:
                        callers.start_soon(phones.call, "alice", "Alice", user, f"{user}-{secrets.token_hex(4)}@{HOST}")

                async def one(user: str) -> None:
                    burst_delays.append(await iphone(user, sip_port))

                async with trio.open_nursery() as devices:
                    for user in users:
                        devices.start_soon(one, user)
    return sequential, [d for d in burst_delays if d is not None]


def _report(name: str, sequential: list[float], burst: list[float], calls: int, burst_n: int) -> None:
    def pct(values: list[float], q: float) -> str:
        if not values:
            return "-"
        values = sorted(values)
        return f"{values[min(len(values) - 1, int(q * len(values)))] * 1000:.1f} ms"

    print(
        f"{name:9} one at a time ({len(sequential)}/{calls} got it): p50 {pct(sequential, 0.5)}, "
        f"p99 {pct(sequential, 0.99)}, mean {statistics.fmean(sequential) * 1000 if sequential else 0:.1f} ms; "
        f"burst of {burst_n} ({len(burst)} got it): p50 {pct(burst, 0.5)}, p99 {pct(burst, 0.99)}"
    )


async def _main(calls: int, burst: int) -> None:
    for name, platform in (("worker", worker_platform), ("baseline", seed_platform)):
        sequential, burst_delays = await measure(platform, calls, burst)
        _report(name, sequential, burst_delays, calls, burst)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=15)
    parser.add_argument("--burst", type=int, default=20)
    args = parser.parse_args()
    trio.run(_main, args.calls, args.burst)


if __name__ == "__main__":
    main()
