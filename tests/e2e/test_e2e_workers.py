"""End to end with several workers and several Kamailio nodes: every late
device gets exactly one fake call, whichever worker sends it and whichever
dies. Real Kamailio, real SIPp phones; the killed worker is a real
``evapi-worker run`` process."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio

from bench import burst
from evapi_worker.config import Config, EvapiSettings
from evapi_worker.core.claims import claim_key
from evapi_worker.core.commands import Pin
from evapi_worker.core.links import NodeAddress
from evapi_worker.lab.kamailio_process import KamailioProcess
from evapi_worker.lab.phones import IPHONE_UA, Phones
from evapi_worker.lab.redis_process import redis_process
from evapi_worker.service import Service

from ..e2e_platform import DOMAIN, EVENT_PATHS, HOST, needs_platform
from ..helpers import stop_group
from ..sipp_device import free_port, free_sip_port

pytestmark = needs_platform


def invites(log: Path) -> list[str]:
    """The Call-IDs of every INVITE a SIPp phone logged."""
    if not log.exists():
        return []
    return [
        line.split("call_id= ", 1)[1].split(" from=")[0].strip()
        for line in log.read_text(errors="replace").splitlines()
        if line.startswith("invite call_id= ")
    ]


def relayed(kam: KamailioProcess, call_id: str) -> int:
    """How many fake INVITEs with ``call_id`` Kamailio relayed to a device
    (a SIPp phone would fold a second INVITE with the same Call-ID into the
    first call: Kamailio's own log line counts each)."""
    return kam.log.read_text(errors="replace").count(f"evw: fake call {call_id} to ")


def kamailio(folder: Path, node: str, *defines: str) -> KamailioProcess:
    folder.mkdir(parents=True, exist_ok=True)
    sip, evapi = free_sip_port(), free_port(socket.SOCK_STREAM)
    # Calls to any account with no contact are held: its iPhone need not have registered before.
    defines = ("EVW_HOLD_ANYONE", *defines)
    return KamailioProcess(HOST, sip, HOST, evapi, node, HOST, folder, domain=DOMAIN, defines=defines)


def address(kam: KamailioProcess) -> NodeAddress:
    return NodeAddress(kam.node, kam.evapi_host, kam.evapi_port, kam.sip_host, kam.sip_port)


async def start_workers(nursery: trio.Nursery, count: int, nodes: Sequence[NodeAddress]) -> list[Service]:
    """``count`` workers in this process, each connected to every node."""
    workers = []
    for _ in range(count):
        service = Service(Config(nodes=tuple(nodes), evapi=EvapiSettings(reconnect_initial=0.01, reconnect_max=0.1)))
        await nursery.start(service.run)
        workers.append(service)
    with trio.fail_after(10):
        while not all(c.connected for w in workers for c in w.connections.values()):
            await trio.sleep(0.02)
    return workers


def total(workers: Sequence[Service], name: str, **labels: str) -> float:
    return sum(w.metrics.value(name, labels) for w in workers)


async def missed_calls(calling: Phones, users: Sequence[str], tag: str) -> dict[str, str]:
    """One call to each user, whose phone sleeps (no contact): held, then the
    caller gives up. Returns the Call-ID of each user's call."""
    call_ids = {user: f"{tag}-{user}@caller.example.net" for user in users}
    async with trio.open_nursery() as nursery:
        for user, call_id in call_ids.items():
            nursery.start_soon(calling.call, "alice", "Alice", user, call_id)
    return call_ids


async def late_iphones(registering: Phones, users: Sequence[str], folder: Path, stay_ms: int = 2500) -> None:
    """Every user's iPhone wakes up and registers at once (a burst)."""
    async with trio.open_nursery() as nursery:
        for user in users:
            log = folder / f"iphone-{user}.log"
            nursery.start_soon(registering.phone, user, IPHONE_UA, f"iphone-{user}", "phone_rings", stay_ms, log)


async def workers_on(kam: KamailioProcess) -> str:
    """What the node itself says of its workers (kamcmd, as an operator asks)."""
    result = await trio.run_process(
        ["kamcmd", "-s", kam.control, "htable.get", "evw", "clients"], capture_stdout=True, check=False
    )
    return result.stdout.decode()


async def test_three_workers_one_node_every_late_iphone_gets_exactly_one_fake_call(tmp_path: Path) -> None:
    kam = kamailio(tmp_path / "k", "solo")
    users = [f"u{i}" for i in range(8)]
    async with kam.running(), trio.open_nursery() as nursery:
        workers = await start_workers(nursery, 3, [address(kam)])
        assert "value: 3" in await workers_on(kam)
        phones = Phones(HOST, kam.sip_port, tmp_path, DOMAIN)
        call_ids = await missed_calls(phones, users, "three")
        await late_iphones(phones, users, tmp_path)
        for user in users:
            assert invites(tmp_path / f"iphone-{user}.log") == [call_ids[user]], user
            assert relayed(kam, call_ids[user]) == 1, user
        assert total(workers, "evapi_worker_fake_calls_sent_total") == len(users)
        assert total(workers, "evapi_worker_claims_total", node="solo", result="won") == len(users)
        assert total(workers, "evapi_worker_claims_total", node="solo", result="taken") == 2 * len(users)
        assert total(workers, "evapi_worker_fake_calls_total", outcome="completed") == len(users)
        assert total(workers, "evapi_worker_fake_calls_total", outcome="taken") == 2 * len(users)
        nursery.cancel_scope.cancel()


async def test_two_workers_two_nodes_call_on_one_phone_on_the_other(tmp_path: Path) -> None:
    # The call is held and given up on node A; the phones register on node
    # B, which holds their connections: the fake calls go through B, once.
    a, b = kamailio(tmp_path / "a", "node-a"), kamailio(tmp_path / "b", "node-b")
    users = [f"v{i}" for i in range(6)]
    async with a.running(), b.running(), trio.open_nursery() as nursery:
        workers = await start_workers(nursery, 2, [address(a), address(b)])
        call_ids = await missed_calls(Phones(HOST, a.sip_port, tmp_path, DOMAIN), users, "two")
        await late_iphones(Phones(HOST, b.sip_port, tmp_path, DOMAIN), users, tmp_path)
        for user in users:
            assert invites(tmp_path / f"iphone-{user}.log") == [call_ids[user]], user
            assert (relayed(a, call_ids[user]), relayed(b, call_ids[user])) == (0, 1), user
        assert total(workers, "evapi_worker_fake_calls_sent_total") == len(users)
        assert total(workers, "evapi_worker_claims_total", node="node-b", result="won") == len(users)
        assert total(workers, "evapi_worker_claims_total", node="node-a", result="won") == 0
        assert total(workers, "evapi_worker_fake_calls_total", outcome="completed") == len(users)
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def worker_process(
    folder: Path, name: str, kam: KamailioProcess | Sequence[KamailioProcess], metrics: str = "off", *options: str
) -> AsyncIterator[trio.Process]:
    """A real ``evapi-worker run`` connected to ``kam`` (or to several
    nodes, in that order), with more ``options``; stopped after."""
    binary = Path(sys.executable).with_name("evapi-worker")
    nodes = [kam] if isinstance(kam, KamailioProcess) else list(kam)
    specs = [
        arg
        for k in nodes
        for arg in ("--kamailio", f"{k.node}={k.evapi_host}:{k.evapi_port},sip={k.sip_host}:{k.sip_port}")
    ]
    # Ready once every node is connected (and the Redis stream, when read).
    ready = [(b"evapi connected", len(nodes))] + ([(b"redis stream connected", 1)] if "--redis" in options else [])
    log = folder / f"{name}.log"
    with log.open("wb") as out:
        proc = await trio.lowlevel.open_process(
            [str(binary), "run", *specs, "--metrics", metrics, *options],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    try:
        with trio.fail_after(10):
            while any(log.read_bytes().count(line) < count for line, count in ready):
                assert proc.returncode is None, log.read_text()
                await trio.sleep(0.05)
        yield proc
    finally:
        await stop_group(proc)


def outcomes(log: Path) -> list[str]:
    return [
        line.split(" outcome=", 1)[1].split()[0]
        for line in log.read_text(errors="replace").splitlines()
        if "fake_call_done" in line
    ]


async def test_a_worker_killed_mid_burst_costs_no_later_device_its_fake_call(tmp_path: Path) -> None:
    kam = kamailio(tmp_path / "k", "kill")
    first, second = [f"w{i}" for i in range(5)], [f"x{i}" for i in range(5)]
    async with kam.running(), AsyncExitStack() as stack:
        procs = [await stack.enter_async_context(worker_process(tmp_path, f"worker{i}", kam)) for i in range(3)]
        phones = Phones(HOST, kam.sip_port, tmp_path, DOMAIN)
        call_ids = await missed_calls(phones, first + second, "kill")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(late_iphones, phones, first, tmp_path)
            await trio.sleep(0.05)  # the burst has begun
            os.killpg(procs[0].pid, signal.SIGKILL)
            await procs[0].wait()
            await trio.sleep(0.2)
            nursery.start_soon(late_iphones, phones, second, tmp_path)
        # Registered before the kill: at most one each (a claim the dead
        # worker won is lost). After it: exactly one each.
        for user in first:
            assert relayed(kam, call_ids[user]) <= 1, user
        for user in second:
            assert invites(tmp_path / f"iphone-{user}.log") == [call_ids[user]], user
            assert relayed(kam, call_ids[user]) == 1, user
        assert "value: 2" in await workers_on(kam)  # the node saw the dead worker go
    # The survivors' fake calls all completed or were taken: no SIPp failed.
    for name in ("worker1", "worker2"):
        assert set(outcomes(tmp_path / f"{name}.log")) <= {"completed", "taken"}, name
    sent = sum(outcomes(tmp_path / f"worker{i}.log").count("completed") for i in (1, 2))
    assert sent >= len(second)


async def test_the_node_arbitrates_claims_and_reports_one_never_used(tmp_path: Path) -> None:
    kam = kamailio(tmp_path / "k", "arb")
    async with kam.running(), trio.open_nursery() as nursery:
        first, second = await start_workers(nursery, 2, [address(kam)])
        claim = claim_key("some-call@x", "bob@example.com", "urn:uuid:iphone")
        # A registered iPhone (pins may only name a registered contact).
        port = free_port()
        phones = Phones(HOST, kam.sip_port, tmp_path, DOMAIN)
        log = tmp_path / "iphone.log"
        nursery.start_soon(partial(phones.phone, "yan", IPHONE_UA, "iphone", "phone_rings", 9000, log, port=port))
        with trio.fail_after(5):
            while not total([first], "evapi_worker_events_total", node="arb", type="register"):
                await trio.sleep(0.05)

        def pin(worker: Service) -> Pin:
            where = (f"sip:dev-iphone@{HOST}:{port};transport=UDP", f"sip:{HOST}:{port};transport=udp")
            key = secrets.token_urlsafe(12)
            ruri, dst = where
            return Pin(key=key, ruri=ruri, dst=dst, ttl=1, claim=claim, claim_ttl=2, aor=f"yan@{DOMAIN}")

        assert (await first.send_command("arb", pin(first))).claim == "won"
        assert (await second.send_command("arb", pin(second))).claim == "taken"
        assert (await first.send_command("arb", pin(first))).claim == "taken"  # once won, for its whole life
        # The winner never calls (as if it died): its pin expires unused and
        # the node tells every worker.
        with trio.fail_after(6):
            while total([first, second], "evapi_worker_claims_unused_total", node="arb") < 2:
                await trio.sleep(0.1)
        # The claim expires after claim_ttl (htable checks every second):
        # then the pair may be claimed again.
        with trio.fail_after(5):
            while (await second.send_command("arb", pin(second))).claim != "won":
                await trio.sleep(0.2)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("redis", EVENT_PATHS)
async def test_a_worker_stopped_in_a_burst_serves_every_phone_once_after_its_restart(
    tmp_path: Path, redis: bool
) -> None:
    # SIGTERM while sixty late iPhones wait for the worker's ten SIPp slots:
    # the fake calls running finish in the grace, the rest are saved, and
    # the restarted worker begins them. Each phone gets exactly one.
    accounts, devices = 12, 5
    names = [burst.account(a) for a in range(accounts)]
    groups = [[(burst.account(a), burst.device(a, d)) for a in range(accounts)] for d in range(devices)]
    (tmp_path / "worker.toml").write_text("[engine]\ndeadline = 30.0\n\n[sipp]\nmax_concurrent = 10\n")
    options = ["--config", str(tmp_path / "worker.toml"), "--state", str(tmp_path / "state")]
    defines = [f"EVW_UDP_BUFFER={burst.UDP_BUFFER}", "EVW_HOLD_ANYONE"]  # held calls, as in bench.burst
    async with AsyncExitStack() as stack:
        if redis:
            server = await stack.enter_async_context(redis_process(tmp_path))
            defines.append(f'EVW_REDIS="name=evw;addr={HOST};port={server.port}"')
            options += ["--redis", server.url]
        kam = KamailioProcess(
            HOST, free_sip_port(), HOST, free_port(socket.SOCK_STREAM), "stop", HOST, tmp_path,
            domain=burst.DOMAIN, defines=tuple(defines),
        )  # fmt: skip
        await stack.enter_async_context(kam.running())
        async with worker_process(tmp_path, "first", kam, "off", *options) as first:
            await burst.missed_calls(tmp_path, kam.sip_port, names)
            await trio.sleep(0.5)
            phones = await burst.devices_wake(tmp_path, kam.sip_port, groups, 1500, 25_000)
            with trio.fail_after(20):  # the first round of fake calls is done, the next runs
                while "outcome=completed" not in (tmp_path / "first.log").read_text():
                    await trio.sleep(0.05)
            os.killpg(first.pid, signal.SIGTERM)
            with trio.fail_after(15):
                await first.wait()
        assert first.returncode == 0
        async with worker_process(tmp_path, "second", kam, "off", *options):
            with trio.fail_after(40):
                for phone in phones:
                    await phone.wait()
    crowd = burst.read_phones([tmp_path / f"phones-{d}.log" for d in range(devices)])
    for a in range(accounts):
        for d in range(devices):
            dev = burst.device(a, d)
            assert [c for c, _ in crowd.invites.get(dev, [])] == [burst.call_id(a)], dev
            assert crowd.cancels.get(dev) == [(burst.call_id(a), "")], dev
    before, after = outcomes(tmp_path / "first.log"), outcomes(tmp_path / "second.log")
    assert set(before) == {"completed", "deferred"} and set(after) == {"completed"}, (before, after)
    assert before.count("deferred") == len(after) and before.count("completed") + len(after) == accounts * devices
