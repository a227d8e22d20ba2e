"""The real ``evapi-worker run`` against hostile input and ordinary faults:
every case that once ended the process, one after another in one process,
which must still be serving afterwards."""

from __future__ import annotations

import contextlib
import json
import re
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from evapi_worker.core.netstring import encode

from ..evapi_server import EvapiServer
from ..sipp_device import fake_runs, fake_sipp, free_port

CONFIG = """
[engine]
max_calls = 5
max_devices = 2
"""

IPHONE = {
    "src_ip": "127.0.0.1", "proto": "udp", "expires": 600, "user_agent": "LinphoneiOS/5",
}  # fmt: skip


def frame(obj: dict[str, object]) -> bytes:
    return encode(json.dumps(obj).encode())


def metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def sample(text: str, name: str, **labels: str) -> float:
    """One sample of a scraped /metrics page (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return 0.0


def healthz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


@contextlib.asynccontextmanager
async def running_worker(tmp_path: Path, server: EvapiServer, *extra: str) -> AsyncIterator[tuple[trio.Process, int]]:
    fake = fake_sipp(tmp_path)
    (tmp_path / "worker.toml").write_text(CONFIG)
    port = free_port(socket.SOCK_STREAM)
    args = [
        sys.executable, "-m", "evapi_worker.cli", "run", "--config", str(tmp_path / "worker.toml"),
        "--kamailio", f"127.0.0.1:{server.port}", "--metrics", f"127.0.0.1:{port}", "--sipp", str(fake),
        "--state", str(tmp_path / "state"), *extra,
    ]  # fmt: skip

    def few_descriptors() -> None:
        # Enough to run, too few for the 300 idle /metrics connections below.
        resource.setrlimit(resource.RLIMIT_NOFILE, (96, 96))

    log = (tmp_path / "worker.log").open("wb")
    proc = await trio.lowlevel.open_process(args, stdout=subprocess.DEVNULL, stderr=log, preexec_fn=few_descriptors)
    try:
        await server.wait_for(lambda: bool(server.streams), timeout=15)
        yield proc, port
    finally:
        if proc.returncode is None:
            proc.terminate()
            with trio.move_on_after(15):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        log.close()


async def late_iphone_gets_its_fake_call(tmp_path: Path, server: EvapiServer, call_id: str) -> None:
    t0 = time.time()
    await server.send(
        server.event("call_start", t0, call_id=call_id, aor="zoe@x", from_user="alice")
        + server.event("call_cancelled", t0 + 0.5, call_id=call_id)
        + server.event(
            "register", t0 + 1, aor="zoe@x", contact="sip:zoe@127.0.0.1:7000", src_port=7000,
            instance=f"<urn:uuid:{call_id}>", **IPHONE,
        )
    )  # fmt: skip
    with trio.fail_after(10):
        while call_id not in fake_runs(tmp_path):
            await trio.sleep(0.05)


async def test_hostile_input_and_faults_leave_the_real_worker_serving(tmp_path: Path) -> None:
    server = EvapiServer()
    idle: list[socket.socket] = []
    async with trio.open_nursery() as nursery:
        await server.start(nursery)
        async with running_worker(tmp_path, server) as (proc, port):
            t0 = time.time()
            hostile = [
                # Not UTF-8.
                encode(b'{"event":"register","aor":"\xff\xfe"}'),
                # Not JSON, not an object, wrong types, an unknown event.
                encode(b"{not json"),
                encode(b"[1,2,3]"),
                frame({"event": "call_start", "node": "kam1", "ts": "soon", "seq": 1, "boot": 1}),
                frame({"event": "teleport", "node": "kam1", "ts": t0, "seq": 2, "boot": 1}),
                # A 15 KB display name (memory per call must stay bounded).
                server.event("call_start", t0, call_id="big", aor="bob@x", from_user="a", from_name="N" * 15000),
                # NaN and infinite times.
                encode(b'{"event":"call_answered","node":"kam1","ts":NaN,"seq":3,"boot":1,"call_id":"n"}'),
                encode(b'{"event":"call_answered","node":"kam1","ts":1e999,"seq":4,"boot":1,"call_id":"n"}'),
                # A shell's metacharacters where a caller's name goes.
                server.event(
                    "call_start",
                    t0,
                    call_id="sh",
                    aor="bob@x",
                    from_user="$(touch /tmp/evw-pwned)",
                    from_name="`reboot`; rm -rf /",
                ),
                server.event("call_cancelled", t0 + 0.1, call_id="sh"),
            ]
            # More devices and calls than the tables hold, over several
            # accounts (once: an orphaned device table and StopIteration).
            for i in range(12):
                aor = f"u{i % 3}@x"
                hostile.append(
                    server.event("call_start", t0, call_id=f"e{i}", aor=aor, from_user="a")
                    + server.event("call_cancelled", t0 + 0.2, call_id=f"e{i}")
                    + server.event(
                        "register",
                        t0 + 0.5,
                        aor=aor,
                        contact=f"sip:d{i}@127.0.0.1:{7100 + i}",
                        src_port=7100 + i,
                        instance=f"<urn:uuid:e{i}>",
                        **IPHONE,
                    )
                )
            for data in hostile:
                await server.send(data)
            # 300 idle connections to /metrics, under a 96-descriptor limit.
            idle += silent_clients(port, 300)
            await trio.sleep(0.5)
            # Still deciding and still calling: a late iPhone gets its fake call.
            await late_iphone_gets_its_fake_call(tmp_path, server, "after-the-storm")
            for s in idle:
                s.close()
            idle.clear()
            await trio.sleep(0.2)
            assert proc.returncode is None
            assert healthz(port) == 200
            text = metrics_text(port)
            assert (
                sample(text, "evapi_worker_event_errors_total", node=f"127.0.0.1:{server.port}", reason="invalid_json")
                == 3
            )
            assert not Path("/tmp/evw-pwned").exists()
        nursery.cancel_scope.cancel()
    log = (tmp_path / "worker.log").read_text()
    assert "Traceback" not in log, log


@contextlib.contextmanager
def small_file_system(path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs at ``path`` (mounted here, unmounted after)."""
    path.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(path)], capture_output=True, check=False
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


async def test_a_full_disk_under_the_capture_is_counted_and_the_worker_goes_on(tmp_path: Path) -> None:
    server = EvapiServer()
    with small_file_system(tmp_path / "small") as small:
        async with trio.open_nursery() as nursery:
            await server.start(nursery)
            async with running_worker(tmp_path, server, "--capture", str(small)) as (proc, port):
                t0 = time.time()
                for i in range(400):  # about 120 KB of capture: more than the disk holds
                    await server.send(server.event("call_answered", t0, call_id=f"fill-{i}" + "x" * 200))
                await late_iphone_gets_its_fake_call(tmp_path, server, "disk-full")
                with trio.fail_after(10):
                    while sample(metrics_text(port), "evapi_worker_capture_lost_total") == 0:
                        await trio.sleep(0.1)
                assert proc.returncode is None
                assert healthz(port) == 200
            nursery.cancel_scope.cancel()
    log = (tmp_path / "worker.log").read_text()
    assert "Traceback" not in log, log
    assert "No space left on device" in log


def silent_clients(port: int, count: int) -> list[socket.socket]:
    """``count`` connections to the metrics port that will send nothing."""
    clients = []
    for _ in range(count):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        clients.append(s)
    return clients


def timed_get(port: int, path: str) -> tuple[int, float]:
    """Status and seconds of one GET (1 s at most, as a scraper may wait)."""
    started = time.monotonic()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1) as response:
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        status = int(exc.code)
    return status, time.monotonic() - started


async def test_silent_clients_never_keep_a_scrape_or_a_health_check_waiting(tmp_path: Path) -> None:
    server = EvapiServer()
    idle: list[socket.socket] = []
    async with trio.open_nursery() as nursery:
        await server.start(nursery)
        async with running_worker(tmp_path, server) as (_proc, port):
            await trio.sleep(0.5)  # connected and answering pings
            idle += silent_clients(port, 200)
            await trio.sleep(0.3)
            # The 200 still connected, silent: each answer within 1 s.
            for path in ("/healthz", "/metrics", "/healthz"):
                status, took = await trio.to_thread.run_sync(timed_get, port, path)
                assert (status, path) == (200, path) and took < 1, took
            for s in idle:
                s.close()
        nursery.cancel_scope.cancel()


async def test_a_flood_of_bad_frames_is_counted_exactly_and_logged_in_a_few_lines(tmp_path: Path) -> None:
    flood = 100_000
    server = EvapiServer()
    async with trio.open_nursery() as nursery:
        await server.start(nursery)
        async with running_worker(tmp_path, server) as (_proc, port):
            node = f"127.0.0.1:{server.port}"
            batch = encode(b"{not json") * 1000
            for _ in range(flood // 1000):
                await server.send(batch)
            with trio.fail_after(60):
                while True:
                    text = await trio.to_thread.run_sync(metrics_text, port)
                    if sample(text, "evapi_worker_event_errors_total", node=node, reason="invalid_json") >= flood:
                        break
                    await trio.sleep(0.2)
            await trio.sleep(1.5)  # the last second's count comes out too
            assert sample(text, "evapi_worker_event_errors_total", node=node, reason="invalid_json") == flood
            # Still serving.
            await late_iphone_gets_its_fake_call(tmp_path, server, "after-the-flood")
        nursery.cancel_scope.cancel()
    lines = [line for line in (tmp_path / "worker.log").read_text().splitlines() if "event rejected" in line]
    assert 0 < len(lines) < 100, len(lines)
    # Each line says how many rejections it stands for; together, all of them.
    counts = [re.search(r" count=(\d+)", line) for line in lines]
    assert sum(int(m.group(1)) for m in counts if m) == flood


async def test_a_worker_frozen_past_the_deadline_sends_no_fake_call_late(tmp_path: Path) -> None:
    # The worker is stopped (SIGSTOP: a VM pause, a debugger) while a call
    # ends and its iPhone registers; 20 s later it runs again and reads
    # both. The REGISTER is 20 s old: its fake call is overdue, not sent.
    server = EvapiServer()
    async with trio.open_nursery() as nursery:
        await server.start(nursery)
        async with running_worker(tmp_path, server) as (proc, port):
            await trio.sleep(0.5)  # a ping has measured the node's clock
            proc.send_signal(signal.SIGSTOP)
            try:
                t0 = time.time()
                await server.send(
                    server.event("call_start", t0, call_id="frozen", aor="zoe@x", from_user="alice")
                    + server.event("call_cancelled", t0 + 0.5, call_id="frozen")
                    + server.event(
                        "register", t0 + 1, aor="zoe@x", contact="sip:zoe@127.0.0.1:7000", src_port=7000,
                        instance="<urn:uuid:frozen>", **IPHONE,
                    )
                )  # fmt: skip
                await trio.sleep(20)
            finally:
                proc.send_signal(signal.SIGCONT)
            with trio.fail_after(10):
                while True:
                    text = await trio.to_thread.run_sync(metrics_text, port)
                    if sample(text, "evapi_worker_fake_calls_total", outcome="overdue") == 1:
                        break
                    await trio.sleep(0.1)
            assert "frozen" not in fake_runs(tmp_path)
            assert not [c for c in server.actions if c["cmd"] == "pin"]
            # Awake again, it serves the next late iPhone in time.
            await late_iphone_gets_its_fake_call(tmp_path, server, "after-the-freeze")
        nursery.cancel_scope.cancel()


async def test_clients_that_ask_for_metrics_and_never_read_keep_no_health_check_waiting(tmp_path: Path) -> None:
    # One process, four threads: connect, GET /metrics, close without reading,
    # as fast as they can for 5 s (bench/http.py; its figures in BENCHMARKS.md).
    server = EvapiServer()
    async with trio.open_nursery() as nursery:
        await server.start(nursery)
        async with running_worker(tmp_path, server) as (_proc, port):
            await trio.sleep(0.5)  # connected and answering pings
            flood = await trio.lowlevel.open_process(
                [sys.executable, "-m", "bench.http", "flood", str(port), "5", "4", "/metrics"],
                cwd=Path(__file__).parent.parent.parent, stdout=subprocess.PIPE,
            )  # fmt: skip
            took = []
            await trio.sleep(0.5)
            while flood.poll() is None:
                status, seconds = await trio.to_thread.run_sync(timed_get, port, "/healthz")
                assert status == 200
                took.append(seconds)
                await trio.sleep(0.1)
            assert flood.stdout is not None
            sent = int(await flood.stdout.receive_some())
            # Every health check answered; nine in ten within 0.5 s, all
            # within 1 s (each waited 8.6 s or more when every request made
            # the metrics text; the bounds leave room for a loaded machine,
            # on which the flood and the test share two cores).
            took.sort()
            assert sent > 1000 and len(took) >= 20, (sent, took)
            assert took[int(len(took) * 0.9)] < 0.5 and took[-1] < 1, took
            status, seconds = await trio.to_thread.run_sync(timed_get, port, "/metrics")
            assert status == 200 and seconds < 1
        nursery.cancel_scope.cancel()
