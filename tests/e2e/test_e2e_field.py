"""End to end in the shapes real deployments have: a SIP domain that is not
the server's address, TLS and TCP phones behind NAT, digest authentication,
calls held while a phone wakes up, phones that already rang. The late phone
is a real liblinphone client wherever the story allows; its own call history
is the truth."""

from __future__ import annotations

import os
import signal
import socket
import threading
from pathlib import Path

import pytest
import trio

from evapi_worker.config import Config
from evapi_worker.core.engine import Act
from evapi_worker.core.links import NodeAddress
from evapi_worker.core.outcomes import Outcome
from evapi_worker.lab.demo import start_watched_worker
from evapi_worker.lab.kamailio_process import KamailioProcess, Subscriber, wait_registered
from evapi_worker.lab.phones import DESK_UA, IPHONE_UA, Phones, received

from ..e2e_platform import DOMAIN, EVENT_PATHS, HOST, Platform, late_iphone, needs_platform, platform, raw_register
from ..helpers import FAST_RECONNECT, demo_folder, running_demo
from ..linphone import Linphone, needs_linphonec
from ..sipp_device import SCENARIOS, free_port, free_sip_port

pytestmark = needs_platform

ANSWERED = 'SIP;cause=200;text="Call completed elsewhere"'


def linphone(p: Platform, user: str, transport: str, password: str | None = None) -> Linphone:
    kam = p.kamailio
    assert kam is not None
    port = kam.tls_port if transport == "tls" else kam.sip_port
    assert port is not None
    return Linphone(p.folder / f"linphone-{user}", user, DOMAIN, f"{HOST}:{port}", transport, password)


async def late_linphone(p: Platform, user: str, desk: str | Path, call_id: str, phone: Linphone) -> tuple[str, str]:
    """The desk phone handles the call; then linphonec (the iPhone app's
    library) starts and registers late. Returns what its call history says
    of the call: (Call-ID, status)."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(p.phones.phone, user, DESK_UA, "desk", desk, 4000, p.folder / f"desk-{user}.log")
        await p.registered(user)
        await p.phones.call("alice", "Alice", user, call_id)
        async with phone.running():
            outcome = await p.watch.outcome(call_id, timeout=15)
            assert outcome is Outcome.COMPLETED, outcome
            logs = await phone.wait_call_logs()
    assert len(logs) == 1, logs
    return logs[0].call_id, f"{logs[0].status} / {logs[0].printed}"


@needs_linphonec
@pytest.mark.parametrize("redis", EVENT_PATHS)
async def test_linphone_on_tls_answered_elsewhere(tmp_path: Path, redis: bool) -> None:
    async with platform(tmp_path, tls=True, redis=redis) as p:
        call_id = "field-tls-answered@caller.example.net"
        got = await late_linphone(p, "bob", "phone_answers", call_id, linphone(p, "bob", "tls"))
        assert got == (call_id, "accepted elsewhere / answered elsewhere")
        (decision,) = [d for d in p.watch.decisions if d.call_id == call_id]
        assert isinstance(decision, Act) and decision.register.proto == "tls"
        assert decision.register.pn_provider == "apns"


@needs_linphonec
async def test_linphone_on_tcp_declined_elsewhere(tmp_path: Path) -> None:
    async with platform(tmp_path) as p:
        call_id = "field-tcp-declined@caller.example.net"
        phone = linphone(p, "carol", "tcp")
        got = await late_linphone(p, "carol", SCENARIOS / "phone_declines.xml", call_id, phone)
        assert got == (call_id, "declined elsewhere / declined elsewhere")


@needs_linphonec
async def test_linphone_on_udp_missed(tmp_path: Path) -> None:
    async with platform(tmp_path) as p:
        call_id = "field-udp-missed@caller.example.net"
        got = await late_linphone(p, "dave", "phone_rings", call_id, linphone(p, "dave", "udp"))
        assert got == (call_id, "missed / missed")


@needs_linphonec
async def test_authentication_only_real_subscribers_register_and_get_fake_calls(tmp_path: Path) -> None:
    subscribers = (Subscriber("erin", "erin-secret"),)
    async with platform(tmp_path, tls=True, subscribers=subscribers) as p:
        # A stranger claims erin's account with an iPhone's User-Agent and no
        # password: challenged, never registered, no event.
        p.phones.passwords = {}
        await p.phones.phone("erin", IPHONE_UA, "intruder", "phone_rings", 300, tmp_path / "intruder.log")
        assert p.metric("evapi_worker_events_total", node="e2e", type="register") == 0
        p.phones.passwords = {"erin": "erin-secret"}
        call_id = "field-auth@caller.example.net"
        phone = linphone(p, "erin", "tls", password="erin-secret")
        got = await late_linphone(p, "erin", "phone_answers", call_id, phone)
        assert got == (call_id, "accepted elsewhere / answered elsewhere")
        assert received(tmp_path / "intruder.log") == (None, None)


@needs_linphonec
async def test_call_to_a_sleeping_account_is_held_then_times_out_and_the_late_phone_sees_it_missed(
    tmp_path: Path,
) -> None:
    # No contact at all: the call is held for EVW_PUSH_HOLD (1 s), then the
    # caller gets 480 and the phone, waking later, a missed call.
    async with platform(tmp_path, defines=("EVW_PUSH_HOLD=1",)) as p:
        call_id = "field-held@caller.example.net"
        # The caller waits for the final answer: Kamailio's 480.
        await p.phones.call("alice", "Alice", "frank", call_id, SCENARIOS / "caller_held.xml")
        with trio.fail_after(2):  # the event may trail the 480 by a moment
            while p.metric("evapi_worker_events_total", node="e2e", type="call_failed") < 1:
                await trio.sleep(0.05)
        assert p.metric("evapi_worker_events_total", node="e2e", type="call_start") == 1
        assert p.metric("evapi_worker_events_total", node="e2e", type="call_cancelled") == 0
        async with linphone(p, "frank", "udp").running() as phone:
            assert await p.watch.outcome(call_id, timeout=15) is Outcome.COMPLETED
            (log,) = await phone.wait_call_logs()
        assert (log.call_id, log.status) == (call_id, "missed")
        assert [(d.action.value, d.reason) for d in p.watch.decisions] == [("fake_call", "missed")]


async def test_only_accounts_with_a_push_device_are_held(tmp_path: Path) -> None:
    """The bundled config as shipped: a call to an account that never
    registered a push device (a typo, a scanner's guess) is answered at
    once; one to an account whose iPhone registered once is held for it."""
    async with platform(tmp_path, hold_anyone=False) as p:
        # Nobody ever registered a push device for gina: 480 at once, no event.
        started = trio.current_time()
        await p.phones.call("alice", "Alice", "gina", "field-unknown@caller.example.net")
        assert trio.current_time() - started < 1.0
        assert p.metric("evapi_worker_events_total", node="e2e", type="call_start") == 0
        # hank's iPhone registered once, then slept: his calls are held.
        await p.phones.phone("hank", IPHONE_UA, "iphone", "phone_rings", 200, tmp_path / "first.log")
        p.watch.decisions.clear()
        call_id = "field-known@caller.example.net"
        await p.phones.call("alice", "Alice", "hank", call_id)
        assert p.metric("evapi_worker_events_total", node="e2e", type="call_start") == 1
        late = tmp_path / "late.log"
        await p.phones.phone("hank", IPHONE_UA, "iphone", "phone_rings", 2000, late)
        assert received(late) == (call_id, None)


async def test_an_awake_iphone_that_rang_gets_no_fake_call_when_it_re_registers(tmp_path: Path) -> None:
    async with platform(tmp_path) as p:
        call_id = "field-rang@caller.example.net"
        first, again = tmp_path / "iphone.log", tmp_path / "iphone-again.log"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(p.phones.phone, "ivan", IPHONE_UA, "iphone", "phone_rings", 5000, first)
            await p.registered("ivan")
            await p.phones.call("alice", "Alice", "ivan", call_id)  # rings on the iPhone, missed
            # The user opens the app: it registers again, from a new port.
            nursery.start_soon(p.phones.phone, "ivan", IPHONE_UA, "iphone", "phone_rings", 2000, again)
        assert received(first) == (call_id, None)
        assert received(again) == (None, None)
        assert [(d.action.value, d.reason) for d in p.watch.decisions] == [("none", "rang")]


async def test_phone_behind_nat_gets_its_fake_call_where_its_register_came_from(tmp_path: Path) -> None:
    async with platform(tmp_path) as p:
        call_id = "field-nat@caller.example.net"
        # Its Contact names a host nobody can reach; only its address works.
        outcome, iphone = await late_iphone(p, "judy", "phone_answers", call_id, contact_host="iphone.invalid")
        assert outcome is Outcome.COMPLETED
        assert received(iphone) == (call_id, ANSWERED)
        (decision,) = p.watch.decisions
        assert isinstance(decision, Act) and "@iphone.invalid" in decision.register.contact


async def test_fake_call_to_a_tcp_phone_whose_connection_is_gone_fails_at_once(tmp_path: Path) -> None:
    async with platform(tmp_path) as p:
        call_id = "field-gone@caller.example.net"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(p.phones.phone, "kim", DESK_UA, "desk", "phone_answers", 3000, tmp_path / "desk.log")
            await p.registered("kim")
            await p.phones.call("alice", "Alice", "kim", call_id)
            # The iPhone registers over TCP and is gone at once (app killed):
            # its connection closes before the fake call comes.
            killed = SCENARIOS / "phone_register_leave.xml"
            await p.phones.phone(
                "kim", IPHONE_UA, "iphone", "phone_rings", 0, tmp_path / "i.log", transport="t1", register=killed
            )
            outcome = await p.watch.outcome(call_id, timeout=10)
        assert outcome is Outcome.UNREACHABLE
        assert p.metric("evapi_worker_fake_calls_total", outcome="unreachable") == 1


@needs_linphonec
async def test_demo_command_serves_udp_tcp_and_tls_phones(tmp_path: Path) -> None:
    """The installed ``evapi-worker demo --tls HOST:PORT --no-scenario``: a
    desk phone on UDP answers; late phones on TCP and TLS both see the call
    as answered elsewhere in their own call history."""
    sip, evapi, tls = free_sip_port(), free_port(socket.SOCK_STREAM), free_port(socket.SOCK_STREAM)
    out = tmp_path / "demo.out"
    async with running_demo(
        out, "--no-scenario", "--metrics", "off", "--sip", f"{HOST}:{sip}", "--evapi", f"{HOST}:{evapi}",
        "--tls", f"{HOST}:{tls}",
    ) as demo:  # fmt: skip
        phones = Phones(HOST, sip, tmp_path, DOMAIN)
        control = f"unix:{demo_folder(out) / 'kamailio_ctl'}"
        call_id = "field-demo@caller.example.net"
        late = [
            Linphone(tmp_path / f"late-{t}", "bob", DOMAIN, f"{HOST}:{port}", t, push_token=f"TOKEN{t.upper()}")
            for t, port in (("tcp", sip), ("tls", tls))
        ]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(phones.phone, "bob", DESK_UA, "desk", "phone_answers", 4000, tmp_path / "desk.log")
            await wait_registered(control, f"bob@{DOMAIN}")
            await phones.call("alice", "Alice", "bob", call_id)
            async with late[0].running() as tcp, late[1].running() as tls_phone:
                logs = {"tcp": await tcp.wait_call_logs(timeout=15), "tls": await tls_phone.wait_call_logs(timeout=15)}
        for entries in logs.values():
            assert [(e.call_id, e.status) for e in entries] == [(call_id, "accepted elsewhere")]
    assert demo.returncode == 0, out.read_text()


async def test_known_push_accounts_survive_a_kamailio_restart(tmp_path: Path) -> None:
    sip, evapi = free_sip_port(), free_port(socket.SOCK_STREAM)

    def kamailio() -> KamailioProcess:
        return KamailioProcess(
            HOST, sip, HOST, evapi, "e2e", HOST, tmp_path, domain=DOMAIN, defines=("EVW_KNOWN_IN_DB",)
        )

    phones = Phones(HOST, sip, tmp_path, DOMAIN)
    async with kamailio().running():
        await phones.phone("lou", IPHONE_UA, "iphone", "phone_rings", 200, tmp_path / "first.log")
    # Stopped cleanly (SIGTERM) and started again: lou is still known, his
    # call is held for the push.
    node = NodeAddress("e2e", HOST, evapi, HOST, sip)
    async with kamailio().running(), trio.open_nursery() as nursery:
        service, _ = await start_watched_worker(nursery, Config(nodes=(node,), evapi=FAST_RECONNECT))
        await phones.call("alice", "Alice", "lou", "field-restart@caller.example.net")
        assert service.metrics.value("evapi_worker_events_total", {"node": "e2e", "type": "call_start"}) == 1
        nursery.cancel_scope.cancel()


async def test_killing_the_demo_takes_its_kamailio_with_it(tmp_path: Path) -> None:
    sip, evapi = free_sip_port(), free_port(socket.SOCK_STREAM)
    out = tmp_path / "demo.out"
    async with running_demo(
        out, "--no-scenario", "--metrics", "off", "--sip", f"{HOST}:{sip}", "--evapi", f"{HOST}:{evapi}"
    ) as demo:
        kamailio_pid = int((demo_folder(out) / "kamailio.pid").read_text())
        os.kill(demo.pid, signal.SIGKILL)  # the demo alone, not its group
        await demo.wait()
        try:
            with trio.fail_after(10):
                while Path(f"/proc/{kamailio_pid}").exists():
                    await trio.sleep(0.1)
        finally:
            if Path(f"/proc/{kamailio_pid}").exists():  # left behind: this test started it, so it stops it
                os.killpg(kamailio_pid, signal.SIGKILL)


async def test_kamailio_outlives_the_thread_that_started_it(tmp_path: Path) -> None:
    # Kamailio's life is tied to the demo with a parent-death signal; had a
    # worker thread started it, Kamailio would end when that thread did
    # (trio ends idle worker threads after 10 s), in the middle of a demo.
    sip, evapi = free_sip_port(), free_port(socket.SOCK_STREAM)
    kam = KamailioProcess(HOST, sip, HOST, evapi, "outlives", HOST, tmp_path)
    async with kam.running():
        # Until every thread there was as Kamailio started has ended (trio's
        # idle worker threads end after 10 s): none of them may take it along.
        others = [t for t in threading.enumerate() if t is not threading.main_thread()]
        with trio.fail_after(30):
            while any(t.is_alive() for t in others):
                await trio.sleep(0.2)
        await trio.sleep(0.5)  # a parent-death signal's delivery
        assert kam.process is not None and kam.process.returncode is None, kam.tail()
        stream = await trio.open_tcp_stream(HOST, evapi)
        await stream.aclose()


@pytest.mark.parametrize(
    ("provider", "status", "caps"),
    [("apns", 200, '*;+sip.pns="apns"'), ("fcm", 200, '*;+sip.pns="fcm"'), ("webpush", 555, None)],
)
async def test_rfc_8599_the_registrar_names_the_push_service_it_serves_or_answers_555(
    tmp_path: Path, provider: str, status: int, caps: str | None
) -> None:
    async with platform(tmp_path) as p:
        assert p.kamailio is not None
        params = f"pn-provider={provider};pn-prid={'ab' * 32}:voip;pn-param=TEAM123456.org.linphone.phone.voip"
        code, reply = await trio.to_thread.run_sync(raw_register, HOST, p.kamailio.sip_port, "nina", DOMAIN, params)
        assert code == status, reply
        found = [
            line.split(":", 1)[1].strip() for line in reply.splitlines() if line.lower().startswith("feature-caps:")
        ]
        assert found == ([caps] if caps else []), reply
        if status == 555:
            assert "Push Notification Service Not Supported" in reply.splitlines()[0]
            with trio.fail_after(5):
                while p.metric("evapi_worker_sip_refused_total", node="e2e", reason="pns_not_supported") < 1:
                    await trio.sleep(0.05)
