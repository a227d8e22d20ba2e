"""The worker's ingest capacity against Kamailio's own evapi emission rate, in one run.

    .venv/bin/python -m bench.ingest_vs_kamailio --events 200000
    .venv/bin/python -m bench.ingest_vs_kamailio --events 200000 --children 4

A real Kamailio (bench/emitter/kamailio.cfg, one SIP worker process, or
``--children`` of them emitting at once) relays N events through evapi as
fast as it can, each built with jansson as the drop-in routes build them and
stamped with Kamailio's time. First a client that only splits frames reads
them: Kamailio's own rate is N over the span of its timestamps. Then the real
worker service reads and handles another N: its capacity is N over the CPU
time its process spent (Kamailio writes with blocking sockets, so wall time
would show whichever side is slower).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import trio

from evapi_worker.config import Config, EvapiSettings
from evapi_worker.core.commands import Hello, encode_command
from evapi_worker.core.links import NodeAddress
from evapi_worker.core.netstring import NEED_DATA, NetstringDecoder
from evapi_worker.net import free_port
from evapi_worker.runtime import tune_gc
from evapi_worker.service import Service

HOST = "127.0.0.1"
CFG = Path(__file__).parent / "emitter" / "kamailio.cfg"


async def _run(events: int, children: int) -> None:
    sip_port, evapi_port = free_port(HOST, socket.SOCK_DGRAM), free_port(HOST, socket.SOCK_STREAM)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        args = [
            "kamailio", "-f", str(CFG), "-DD", "-E", "-Y", tmp, "-P", str(folder / "k.pid"), "-w", tmp,
            "-A", f"EMIT_SIP_PORT={sip_port}", "-A", f'EMIT_EVAPI="{HOST}:{evapi_port}"',
            "-A", f"EMIT_CHILDREN={children}",
        ]  # fmt: skip
        with (folder / "kamailio.log").open("wb") as log:
            proc = await trio.lowlevel.open_process(args, stdout=log, stderr=log, start_new_session=True)
        try:
            node = NodeAddress("emitter", HOST, evapi_port, HOST, sip_port)
            # Shedding off: the CPU cost of deciding every event is measured.
            service = Service(Config(nodes=(node,), evapi=EvapiSettings(shed_above=0)))
            stamps: list[float] = []
            done = trio.Event()
            handle = service.on_frame
            seen = 0

            def on_frame(node: str, payload: bytes, now: float) -> None:
                nonlocal seen
                handle(node, payload, now)
                seen += 1
                if seen == events:
                    done.set()

            kamailio_rate = await _free_rate(sip_port, evapi_port, events, children)
            # The worker's run: its handler sees every frame; the timestamps
            # are read afterwards from a copy, outside the measured CPU.
            copies: list[bytes] = []
            original = on_frame

            def on_frame_kept(node: str, payload: bytes, now: float) -> None:
                copies.append(payload)
                original(node, payload, now)

            on_frame = on_frame_kept
            for conn in service.connections.values():
                conn._on_frame = on_frame
            async with trio.open_nursery() as nursery:
                await nursery.start(service.run)
                with trio.fail_after(15):
                    while not service.connections["emitter"].connected:  # noqa: ASYNC110
                        await trio.sleep(0.05)
                cpu_before = time.process_time()
                wall_before = trio.current_time()
                await _ask_all(sip_port, events, children, "worker")
                with trio.fail_after(120):
                    await done.wait()
                cpu = time.process_time() - cpu_before
                wall = trio.current_time() - wall_before
                nursery.cancel_scope.cancel()
        finally:
            os.killpg(proc.pid, 15)
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await proc.wait()
    stamps = [_stamp(p) for p in copies]
    span = max(stamps) - min(stamps)
    worker_capacity = events / cpu
    workers = "one SIP worker" if children == 1 else f"{children} SIP workers at once"
    print(f"events: {events:,}; Kamailio alone (frame-splitting client): {kamailio_rate:,.0f} events/s ({workers})")
    print(f"with the worker reading, Kamailio's timestamps span {span:.3f} s: {events / span:,.0f} events/s")
    print(f"worker: all handled {wall:.3f} s after the request; CPU {cpu:.3f} s")
    print(f"worker capacity: {worker_capacity:,.0f} events/s")
    print(f"worker capacity / Kamailio rate: {worker_capacity / kamailio_rate:.2f}x")


async def _ask(sip_port: int, events: int, tag: str) -> None:
    """One MESSAGE asking the emitter for ``events`` events."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    with sock:
        await sock.bind((HOST, 0))
        port = sock.getsockname()[1]
        message = (
            f"MESSAGE sip:emit@{HOST}:{sip_port} SIP/2.0\r\nVia: SIP/2.0/UDP {HOST}:{port};branch=z9hG4bK-{tag}\r\n"
            f"From: <sip:b@{HOST}>;tag={tag}\r\nTo: <sip:emit@{HOST}>\r\nCall-ID: emit-{tag}@{HOST}\r\n"
            f"CSeq: 1 MESSAGE\r\nMax-Forwards: 70\r\nX-Count: {events}\r\nContent-Length: 0\r\n\r\n"
        )
        await sock.sendto(message.encode(), (HOST, sip_port))


def _stamp(frame: bytes) -> float:
    return float(json.loads(frame)["ts"])


async def _ask_all(sip_port: int, events: int, children: int, tag: str) -> None:
    """One MESSAGE per SIP worker, each asking for its share of ``events``."""
    for i in range(children):
        share = events // children + (1 if i < events % children else 0)
        await _ask(sip_port, share, f"{tag}{i}")


async def _free_rate(sip_port: int, evapi_port: int, events: int, children: int) -> float:
    """Kamailio's emission rate to a client that reads and only splits frames."""
    with trio.fail_after(15):
        while True:
            try:
                stream = await trio.open_tcp_stream(HOST, evapi_port)
                break
            except OSError:
                await trio.sleep(0.05)
    frames: list[bytes] = []
    async with stream:
        # Events go to connections that said hello (a worker's first command).
        await stream.send_all(encode_command(Hello(id="bench")))
        await _ask_all(sip_port, events, children, "count")
        decoder = NetstringDecoder()
        with trio.fail_after(120):
            while len(frames) < events:
                decoder.receive_data(await stream.receive_some(1 << 20))
                while (frame := decoder.next_frame()) is not NEED_DATA:
                    assert isinstance(frame, bytes)
                    if b'"cmd_result"' not in frame:  # the hello's answer
                        frames.append(frame)
    # Several workers interleave: the span is from the earliest stamp to the latest.
    stamps = [_stamp(f) for f in frames]
    return events / (max(stamps) - min(stamps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--children", type=int, default=1, help="Kamailio SIP workers emitting at once")
    args = parser.parse_args()
    tune_gc()
    trio.run(_run, args.events, args.children)


if __name__ == "__main__":
    main()
