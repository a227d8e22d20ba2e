"""IPv6 phones, with real Kamailio (listening on 127.0.0.1 and ::1), SIPp
and linphonec: late phones that registered over IPv6 get their fake call
(over their own connection for TCP and TLS), beside IPv4 phones of the same
account, whether the worker's fake calls leave from IPv4 or from IPv6."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from evapi_worker.core.engine import Act, Strategy
from evapi_worker.core.outcomes import Outcome
from evapi_worker.lab.phones import DESK_UA, IPHONE_UA, Phones, received

from ..e2e_platform import DOMAIN, HOST, Platform, needs_platform, platform
from ..helpers import running_demo
from ..linphone import Linphone, needs_linphonec
from ..sipp_device import SCENARIOS, free_port

pytestmark = needs_platform

V6 = "::1"
ANSWERED = 'SIP;cause=200;text="Call completed elsewhere"'


def v6_phones(p: Platform) -> Phones:
    return Phones(V6, p.kamailio.sip_port, p.folder, DOMAIN)


def linphone6(p: Platform, user: str, transport: str) -> Linphone:
    port = p.kamailio.tls_port if transport == "tls" else p.kamailio.sip_port
    assert port is not None
    return Linphone(p.folder / f"linphone6-{user}-{transport}", user, DOMAIN, f"[{V6}]:{port}", transport)


@asynccontextmanager
async def after_desk_call(
    p: Platform, user: str, desk: str, call_id: str, stay_ms: int = 4000
) -> AsyncIterator[trio.Nursery]:
    """The user's IPv4 desk phone registers and handles alice's call
    (``desk``: answers or rings until she gives up); then the block runs."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(p.phones.phone, user, DESK_UA, "desk", desk, stay_ms, p.folder / f"desk-{user}.log")
        await p.registered(user)
        await p.phones.call("alice", "Alice", user, call_id)
        yield nursery


async def test_iphone_on_ipv6_gets_the_call_its_ipv4_desk_phone_answered(tmp_path: Path) -> None:
    async with platform(tmp_path, sip6=V6) as p:
        call_id = "v6-answered@caller.example.net"
        log = tmp_path / "iphone6.log"
        async with after_desk_call(p, "bob", "phone_answers", call_id) as nursery:
            nursery.start_soon(v6_phones(p).phone, "bob", IPHONE_UA, "iphone6", "phone_rings", 2500, log)
            assert await p.watch.outcome(call_id, timeout=10) is Outcome.COMPLETED
        assert received(log) == (call_id, ANSWERED)
        (decision,) = p.watch.decisions
        assert isinstance(decision, Act)
        assert decision.register.src_ip == V6 and f"[{V6}]" in decision.register.contact


@needs_linphonec
async def test_linphone_on_ipv6_tcp_and_an_ipv4_iphone_both_get_the_missed_call(tmp_path: Path) -> None:
    async with platform(tmp_path, sip6=V6) as p:
        call_id = "v6-missed@caller.example.net"
        ipv4_log = tmp_path / "iphone4.log"
        async with (
            after_desk_call(p, "carol", "phone_rings", call_id, 6000) as nursery,
            linphone6(p, "carol", "tcp").running() as phone,
        ):
            nursery.start_soon(p.phones.phone, "carol", IPHONE_UA, "iphone4", "phone_rings", 3000, ipv4_log)
            (log,) = await phone.wait_call_logs(timeout=15)
        assert (log.call_id, log.status) == (call_id, "missed")
        assert received(ipv4_log) == (call_id, None)
        sources = sorted(d.register.src_ip for d in p.watch.decisions if isinstance(d, Act))
        assert sources == ["127.0.0.1", V6]


@needs_linphonec
async def test_a_worker_on_ipv6_serves_a_tls_phone_on_ipv6(tmp_path: Path) -> None:
    # The worker's SIPp sends from ::1 to Kamailio's ::1 (its evapi
    # connection stays on 127.0.0.1: see the README).
    async with platform(tmp_path, sip6=V6, worker_sip=V6, tls=True) as p:
        call_id = "v6-tls@caller.example.net"
        async with (
            after_desk_call(p, "dave", "phone_answers", call_id),
            linphone6(p, "dave", "tls").running() as phone,
        ):
            assert await p.watch.outcome(call_id, timeout=15) is Outcome.COMPLETED
            (log,) = await phone.wait_call_logs()
        assert (log.call_id, log.status) == (call_id, "accepted elsewhere")
        assert "fake call" in p.kamailio.log.read_text()


async def test_a_message_reaches_a_phone_on_ipv6(tmp_path: Path) -> None:
    async with platform(tmp_path, sip6=V6, strategy=Strategy.MESSAGE) as p:
        call_id = "v6-message@caller.example.net"
        log = tmp_path / "iphone6.log"
        async with after_desk_call(p, "erin", "phone_answers", call_id) as nursery:
            nursery.start_soon(
                v6_phones(p).phone, "erin", IPHONE_UA, "iphone6", SCENARIOS / "phone_message.xml", 2500, log
            )
            assert await p.watch.outcome(call_id, timeout=10) is Outcome.COMPLETED
        assert f"call-ended;call-id={call_id};reason=answered" in log.read_text()


async def test_the_demo_on_ipv6(tmp_path: Path) -> None:
    sip = free_port()
    evapi = free_port(socket.SOCK_STREAM)
    out = tmp_path / "demo.out"
    async with running_demo(
        out, "--sip", f"[{V6}]:{sip}", "--evapi", f"{HOST}:{evapi}", "--metrics", "off", ready_within=60
    ) as demo:
        pass
    printed = out.read_text()
    assert demo.returncode == 0, printed
    assert printed.count("(the original call's)") == 2, printed
    assert "fake call outcome: completed" in printed
    assert f"[{V6}]:{sip}" in printed
