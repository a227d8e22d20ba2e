"""A crowd of late iPhones at once: real Kamailio (the bundled config), the
real worker (``evapi-worker run``) and real SIPp on both sides.

    .venv/bin/python -m bench.burst --accounts 100 --devices 10 --ring-delay 300
    .venv/bin/python -m bench.burst --accounts 100 --devices 10 --ring-delay 300 --redis

Kamailio asks for a 4 MiB UDP buffer (``EVW_UDP_BUFFER``; ``--udp-buffer
0`` for its default 256 KiB, where the burst overflows it and waits for
SIPp's retransmissions). Each account gets one call that rings (held for the push) and is given up
(a missed call); then every device of every account registers at once,
from SIPp phone processes (one per device index, each holding one device
of every account, so that no phone process sees one Call-ID twice). A
phone rings ``--ring-delay`` ms after a fake INVITE (an app sets up its
call first) and answers the CANCEL. Reported: whether every device got
exactly one fake call with its account's Call-ID and a missed call's
CANCEL (no Reason), INVITE after REGISTER percentiles (the phones' own
clock), the worker's outcomes, and the peak memory and processes of the
worker and of the SIPp it runs. Exits 1 when a device was not served.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from evapi_worker.lab.kamailio_process import KamailioProcess, control_socket
from evapi_worker.lab.redis_process import redis_process
from evapi_worker.net import bind_error, free_media_port, free_port

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent / "sipp"
CALLERS = ROOT / "tests" / "sipp" / "callers_cancel.xml"
HOST = "127.0.0.1"
DOMAIN = "burst.example.com"
UDP_BUFFER = 4 * 1024 * 1024  # Kamailio's, for a burst (EVW_UDP_BUFFER)
BURST_WINDOW = 3.0  # seconds after the devices start registering: the burst's CPU


def account(a: int) -> str:
    return f"acct{a:04d}"


def device(a: int, d: int) -> str:
    return f"dev{a:04d}x{d:03d}"


def call_id(a: int) -> str:
    # SIPp's call number n (from 1) calls account n-1 (see -cid_str).
    return f"crowd-{a + 1}@caller.example.net"


@dataclass
class Peak:
    """The worker's and its SIPp children's peak resident memory and count."""

    worker_kib: int = 0
    sipp_kib: int = 0
    sipp_processes: int = 0
    samples: int = 0

    def sample(self, worker: int) -> None:
        self.samples += 1
        self.worker_kib = max(self.worker_kib, _rss_kib(worker))
        children = [pid for pid in _pids() if _ppid(pid) == worker and _comm(pid) == "sipp"]
        self.sipp_processes = max(self.sipp_processes, len(children))
        self.sipp_kib = max(self.sipp_kib, sum(_rss_kib(pid) for pid in children))


def cpu_seconds(worker: int) -> dict[str, float]:
    """CPU time so far of the worker, its SIPp, Kamailio and the other SIPp
    (the phones and callers), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    totals = {"worker": 0.0, "worker_sipp": 0.0, "kamailio": 0.0, "phones_sipp": 0.0}
    for pid in _pids():
        stat = _read(f"/proc/{pid}/stat")
        if not stat:
            continue
        fields = stat.rsplit(") ", 1)[1].split()
        used = (int(fields[11]) + int(fields[12])) / tick
        comm = _comm(pid)
        if pid == worker:
            totals["worker"] += used
        elif comm == "sipp":
            totals["worker_sipp" if _ppid(pid) == worker else "phones_sipp"] += used
        elif comm == "kamailio":
            totals["kamailio"] += used
    return totals


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _ppid(pid: int) -> int:
    stat = _read(f"/proc/{pid}/stat")
    return int(stat.rsplit(") ", 1)[1].split()[1]) if stat else -1


def _comm(pid: int) -> str:
    return _read(f"/proc/{pid}/comm").strip()


def _rss_kib(pid: int) -> int:
    match = re.search(r"VmRSS:\s+(\d+)", _read(f"/proc/{pid}/status"))
    return int(match.group(1)) if match else 0


@dataclass
class Crowd:
    """What the phones saw."""

    registered: dict[str, int] = field(default_factory=dict)  # device -> SIPp clock (ms)
    invites: dict[str, list[tuple[str, int]]] = field(default_factory=dict)  # device -> [(Call-ID, clock)]
    cancels: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # device -> [(Call-ID, Reason)]


def read_phones(logs: list[Path]) -> Crowd:
    crowd = Crowd()
    for log in logs:
        for line in log.read_text(errors="replace").splitlines():
            if m := re.match(r"reg dev=(\S+) t=(\d+)", line):
                crowd.registered[m[1]] = int(m[2])
            elif m := re.match(r"invite dev=(\S+) call_id=\s*(\S+) t=(\d+)", line):
                crowd.invites.setdefault(m[1], []).append((m[2], int(m[3])))
            elif m := re.match(r"cancel dev=(\S+) call_id=\s*(\S+) reason=\s*(.*)$", line):
                crowd.cancels.setdefault(m[1], []).append((m[2], m[3].strip()))
    return crowd


async def sipp(
    folder: Path, name: str, sip_port: int, *args: str, listens: socket.SocketKind = socket.SOCK_DGRAM
) -> trio.Process:
    """A SIPp against the node, its log and errors beside the run's files;
    started again on other ports when one it was given was taken meanwhile
    (``listens``: the kind of socket it binds, a TCP one with ``-t tn``)."""
    for _ in range(5):
        port = free_port(HOST)
        command = [
            "sipp", f"{HOST}:{sip_port}", "-i", HOST, "-p", str(port), "-nostdin", "-key", "domain", DOMAIN,
            "-buff_size", "4194304", "-mp", str(free_media_port(HOST)),
            "-trace_logs", "-log_file", str(folder / f"{name}.log"), "-trace_err", "-error_file",
            str(folder / f"{name}.errors"), *args,
        ]  # fmt: skip
        process = await trio.lowlevel.open_process(
            command, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        with trio.move_on_after(5):
            while process.poll() is None and bind_error(HOST, port, listens) is None:  # noqa: ASYNC110 (another process binding: no event for it)
                await trio.sleep(0.005)
        errors = folder / f"{name}.errors"
        if process.poll() is None or not errors.exists() or "bind" not in errors.read_text(errors="replace"):
            return process
        errors.unlink()
    raise RuntimeError(f"SIPp {name} could not bind its ports")


@asynccontextmanager
async def platform(
    folder: Path, worker_toml: str = "", udp_buffer: int = UDP_BUFFER, shm_mib: int = 0, redis: bool = False,
    tcp_connections: int = 0, defines: tuple[str, ...] = (),
) -> AsyncIterator[tuple[int, trio.Process, int]]:  # fmt: skip
    """Kamailio (asking for ``udp_buffer`` bytes of UDP buffer, ``shm_mib``
    of shared memory, ``tcp_connections`` at most; 0: its defaults; more
    ``defines``) and the real worker beside it, the events through a
    redis-server of their own with ``redis``: (SIP port, worker, metrics
    port)."""
    async with AsyncExitStack() as stack:
        sip_port, evapi_port, metrics_port = free_port(HOST), free_port(HOST, socket.SOCK_STREAM), 0
        # Each account's call is held for its push: in the field its phones
        # registered before (a known push account); the crowd skips that.
        if "EVW_HOLD_ANYONE" not in defines:
            defines += ("EVW_HOLD_ANYONE",)
        if udp_buffer:
            defines += (f"EVW_UDP_BUFFER={udp_buffer}",)
        if tcp_connections:
            defines += (f"EVW_TCP_MAX_CONNECTIONS={tcp_connections}",)
        more: list[str] = []
        ready = ["evapi connected"]
        if redis:
            server = await stack.enter_async_context(redis_process(folder))
            defines += (f'EVW_REDIS="name=evw;addr={HOST};port={server.port}"',)
            more += ["--redis", server.url]
            ready.append("redis stream connected")
        kamailio = KamailioProcess(
            HOST, sip_port, HOST, evapi_port, "crowd", HOST, folder, domain=DOMAIN, defines=defines,
            shm_mib=shm_mib or None,
        )  # fmt: skip
        metrics_port = free_port(HOST, socket.SOCK_STREAM)
        (folder / "worker.toml").write_text(worker_toml)
        log = folder / "worker.log"
        args = [
            sys.executable, "-m", "evapi_worker.cli", "run", "--kamailio",
            f"crowd=127.0.0.1:{evapi_port},sip={HOST}:{sip_port}", "--metrics", f"{HOST}:{metrics_port}",
            "--config", str(folder / "worker.toml"), *more,
        ]  # fmt: skip
        await stack.enter_async_context(kamailio.running())
        with log.open("ab") as sink:
            worker = await trio.lowlevel.open_process(args, stdout=subprocess.DEVNULL, stderr=sink, cwd=folder)
        try:
            with trio.fail_after(15):
                while not all(line in log.read_text() for line in ready):
                    if worker.poll() is not None:
                        raise RuntimeError(f"the worker ended: {log.read_text()[-2000:]}")
                    await trio.sleep(0.05)
            yield sip_port, worker, metrics_port
        finally:
            worker.terminate()
            with trio.move_on_after(10):
                await worker.wait()
            if worker.poll() is None:
                worker.kill()
                await worker.wait()


async def missed_calls(folder: Path, sip_port: int, accounts: list[str]) -> None:
    """One call to each account, held for its push and given up 300 ms in."""
    (folder / "calls.csv").write_text("SEQUENTIAL\n" + "".join(f"{a};\n" for a in accounts))
    callers = await sipp(
        folder, "callers", sip_port, "-sf", str(CALLERS), "-inf", str(folder / "calls.csv"),
        "-m", str(len(accounts)), "-r", "200", "-l", str(len(accounts)), "-timeout", "60",
        "-cid_str", "crowd-%u@caller.example.net",
    )  # fmt: skip
    if await callers.wait() != 0:
        raise RuntimeError("callers failed: " + (folder / "callers.errors").read_text(errors="replace")[-2000:])


async def devices_wake(
    folder: Path, sip_port: int, devices: list[list[tuple[str, str]]], ring_delay: int, stay_ms: int,
    ignore_cancel: bool = False, name: str = "phones", transport: str = "udp",
) -> list[trio.Process]:  # fmt: skip
    """Every device registers at once, one phone process per list of
    (account, device), over UDP or each device on a TCP connection of its
    own (``transport`` "tcp"); the processes end after ``stay_ms``."""
    processes = []
    for k, group in enumerate(devices):
        csv = folder / f"{name}-{k}.csv"
        csv.write_text("SEQUENTIAL\n" + "".join(f"{a};{d};\n" for a, d in group))
        args = [
            "-sf", str(HERE / "devices_register.xml"), "-oocsf", str(HERE / "phone_rings_late.xml"),
            "-inf", str(csv), "-m", str(len(group)), "-r", "10000", "-l", str(len(group)),
            "-d", str(stay_ms), "-timeout", str(stay_ms // 1000 + 30),
            "-key", "ring_delay", str(ring_delay), "-key", "ignore_cancel", "1" if ignore_cancel else "0",
            *(["-t", "tn", "-max_socket", str(len(group) + 100)] if transport == "tcp" else []),
        ]  # fmt: skip
        listens = socket.SOCK_STREAM if transport == "tcp" else socket.SOCK_DGRAM
        processes.append(await sipp(folder, f"{name}-{k}", sip_port, *args, listens=listens))
    return processes


def scrape(port: int) -> tuple[dict[str, float], str]:
    """The worker's fake-call outcomes, and where it read its events: "redis"
    while it reads the stream (the node then writes none to evapi)."""
    text = urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5).read().decode()
    values: dict[str, float] = {}
    through = "evapi"
    for line in text.splitlines():
        if line.startswith("evapi_worker_fake_calls_total{"):
            outcome = re.search(r'outcome="([^"]+)"', line)
            if outcome:
                values[outcome[1]] = float(line.rsplit(" ", 1)[1])
        elif line == "evapi_worker_redis_connected 1.0":
            through = "redis"
    return values, through


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


async def shm_mib(folder: Path) -> dict[str, float]:
    """Kamailio's shared memory, in MiB: its size and the most it used."""
    reply = await trio.run_process(
        ["kamcmd", "-s", control_socket(folder), "core.shmmem"], capture_stdout=True, check=False
    )
    fields = dict(re.findall(r"(\w+):\s*(\d+)", reply.stdout.decode()))
    return {name: round(int(fields.get(name, 0)) / 2**20, 1) for name in ("total", "max_used")}


async def run(
    accounts: int,
    devices: int,
    ring_delay: int,
    folder: Path,
    stay_ms: int = 20_000,
    udp_buffer: int = UDP_BUFFER,
    shm: int = 0,
    redis: bool = False,
    transport: str = "udp",
) -> dict[str, object]:
    """The whole story; ``stay_ms``: how long the phones stay registered
    (the burst must be over by then)."""
    names = [account(a) for a in range(accounts)]
    groups = [[(account(a), device(a, d)) for a in range(accounts)] for d in range(devices)]
    peak = Peak()
    # Each TCP phone holds a connection: room for them all (and the callers').
    connections = accounts * devices + 1000 if transport == "tcp" else 0
    # More devices an account than the bundled registrar takes (twelve): let them in.
    defines = (f"EVW_ACCOUNT_CONTACTS={devices}",) if devices > 12 else ()
    async with platform(
        folder, udp_buffer=udp_buffer, shm_mib=shm, redis=redis, tcp_connections=connections, defines=defines
    ) as (
        sip_port,
        worker,
        metrics_port,
    ):
        await missed_calls(folder, sip_port, names)
        await trio.sleep(0.5)
        cpu_before = cpu_seconds(worker.pid)
        phones = await devices_wake(folder, sip_port, groups, ring_delay, stay_ms, transport=transport)
        woke = trio.current_time()
        cpu_burst: dict[str, float] = {}
        with trio.fail_after(stay_ms / 1000 + 40):
            while any(p.poll() is None for p in phones):
                peak.sample(worker.pid)
                if not cpu_burst and trio.current_time() - woke >= BURST_WINDOW:
                    cpu_burst = cpu_seconds(worker.pid)
                await trio.sleep(0.1)
        outcomes, through = scrape(metrics_port)
        cpu_after = cpu_seconds(worker.pid)
        kamailio_shm = await shm_mib(folder)
    crowd = read_phones([folder / f"phones-{k}.log" for k in range(devices)])
    problems: list[str] = []
    delays: list[float] = []
    for a in range(accounts):
        for d in range(devices):
            dev = device(a, d)
            invites = crowd.invites.get(dev, [])
            if [c for c, _ in invites] != [call_id(a)]:
                problems.append(f"{dev}: INVITEs {[c for c, _ in invites]}")
                continue
            if crowd.cancels.get(dev) != [(call_id(a), "")]:
                problems.append(f"{dev}: CANCELs {crowd.cancels.get(dev)}")
            if dev in crowd.registered:
                delays.append((invites[0][1] - crowd.registered[dev]) / 1000)
    total = accounts * devices
    return {
        "events_through": through,
        "phones_transport": transport,
        "devices": total,
        "served": total - len({p.split(":")[0] for p in problems}),
        "problems": problems[:20],
        "invite_after_register_s": {f"p{q}": round(percentile(delays, q), 3) for q in (50, 90, 99)}
        | {"max": round(max(delays), 3) if delays else None},
        "worker_outcomes": outcomes,
        # CPU in the first seconds (the burst, the phones included), and
        # in the whole run (the phones excluded: they have ended).
        f"cpu_seconds_first_{BURST_WINDOW:g}s": {k: round(cpu_burst.get(k, 0) - cpu_before[k], 2) for k in cpu_before},
        "cpu_seconds_run": {k: round(cpu_after[k] - cpu_before[k], 2) for k in cpu_after if k != "phones_sipp"},
        "peak": {
            "worker_rss_mib": round(peak.worker_kib / 1024, 1),
            "sipp_processes": peak.sipp_processes,
            "sipp_rss_mib": round(peak.sipp_kib / 1024, 1),
            # Kamailio's shared memory: each held call and transaction lives there.
            "kamailio_shm_mib": kamailio_shm,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accounts", type=int, default=100)
    parser.add_argument("--devices", type=int, default=10, help="push devices per account")
    parser.add_argument("--ring-delay", type=int, default=300, help="ms from a fake INVITE to the phone's 180")
    parser.add_argument("--keep", type=Path, help="keep the run's files (logs) in this folder")
    parser.add_argument(
        "--udp-buffer", type=int, default=UDP_BUFFER, help="Kamailio's UDP buffer (EVW_UDP_BUFFER); 0: its default"
    )
    parser.add_argument("--shm", type=int, default=0, help="Kamailio's shared memory in MiB (-m); 0: its default, 64")
    parser.add_argument("--redis", action="store_true", help="the events through a Redis stream (EVW_REDIS, --redis)")
    parser.add_argument(
        "--transport", choices=("udp", "tcp"), default="udp", help="the phones': tcp gives each its own connection"
    )
    args = parser.parse_args()
    if shutil.which("sipp") is None or shutil.which("kamailio") is None:
        sys.exit("bench.burst needs sipp and kamailio (./scripts/setup.sh --test)")
    folder = Path(tempfile.mkdtemp(prefix="evapi-burst-")) if args.keep is None else args.keep
    folder.mkdir(parents=True, exist_ok=True)
    try:
        result = trio.run(
            run,
            args.accounts,
            args.devices,
            args.ring_delay,
            folder,
            20_000,
            args.udp_buffer,
            args.shm,
            args.redis,
            args.transport,
        )
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps(result, indent=2))
    if result["served"] != result["devices"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
