"""End to end: real Kamailio (the bundled config), the worker, real SIPp phones."""

from __future__ import annotations

import shutil
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from evapi_worker.capture import CaptureSettings
from evapi_worker.config import Config, PushSettings
from evapi_worker.demo import (
    DESK_UA,
    IPHONE_UA,
    KamailioProcess,
    Phones,
    Subscriber,
    Watch,
    received,
    start_watched_worker,
)
from evapi_worker.engine import Act, EngineSettings, Strategy
from evapi_worker.evapi_client import NodeAddress
from evapi_worker.outcomes import Outcome
from evapi_worker.service import Service
from evapi_worker.sipp_runner import SippSettings

from .helpers import FAST_RECONNECT
from .sipp_device import SCENARIOS, free_port, free_sip_port

pytestmark = pytest.mark.skipif(
    shutil.which("kamailio") is None or shutil.which("sipp") is None,
    reason="needs kamailio and sipp (apt-get install kamailio kamailio-extra-modules sip-tester)",
)

HOST = "127.0.0.1"
# A SIP domain that is not the server's address: accounts are bob@DOMAIN,
# contacts are dev-...@127.0.0.1, as in a real deployment.
DOMAIN = "voip.example.org"


@dataclass
class Platform:
    service: Service
    phones: Phones
    watch: Watch
    folder: Path
    kamailio: KamailioProcess

    def metric(self, name: str, **labels: str) -> float:
        return self.service.metrics.value(name, labels)

    async def events(self, etype: str, count: int = 1, timeout: float = 5.0) -> None:
        """Wait until the worker has received ``count`` events of ``etype``."""
        with trio.fail_after(timeout):
            while self.metric("evapi_worker_events_total", node=self.service.config.nodes[0].name, type=etype) < count:
                await trio.sleep(0.02)

    async def registered(self, user: str, count: int = 1) -> None:
        """Wait until Kamailio has ``count`` Contacts of ``user`` (not a guess of time)."""
        await self.kamailio.wait_registered(f"{user}@{self.phones.domain}", count)


@asynccontextmanager
async def platform(
    tmp_path: Path,
    domain: str | None = DOMAIN,
    *,
    tls: bool = False,
    subscribers: tuple[Subscriber, ...] | None = None,
    defines: tuple[str, ...] = (),
    sip6: str | None = None,
    worker_sip: str = HOST,
    push: PushSettings | None = None,
    capture: CaptureSettings | None = None,
    kamailio: KamailioProcess | None = None,
    **engine: Any,
) -> AsyncIterator[Platform]:
    """The bundled Kamailio (serving ``domain``, with TLS, authentication,
    an IPv6 address besides 127.0.0.1 (``sip6``) and more ``-A`` defines
    when asked), or the ``kamailio`` given, and a worker connected to it,
    whose fake calls go out from ``worker_sip`` (127.0.0.1, or the IPv6
    address)."""
    if kamailio is None:
        tls_port = free_port(socket.SOCK_STREAM) if tls else None
        kamailio = KamailioProcess(
            HOST, free_sip_port(), HOST, free_port(socket.SOCK_STREAM), "e2e", worker_sip, tmp_path,
            domain=domain, tls_port=tls_port, subscribers=subscribers, defines=defines, sip6_host=sip6,
        )  # fmt: skip
    kam, sip_port, evapi_port = kamailio, kamailio.sip_port, kamailio.evapi_port
    node = NodeAddress(kam.node, HOST, evapi_port, worker_sip, sip_port)
    passwords = {s.user: s.password for s in subscribers or ()}
    async with kam.running(), trio.open_nursery() as nursery:
        config = Config(
            nodes=(node,),
            engine=EngineSettings(**engine),
            sipp=SippSettings(local_ip=worker_sip),
            evapi=FAST_RECONNECT,
            push=push or PushSettings(),
            capture=capture,
        )
        service, watch = await start_watched_worker(nursery, config)
        phones = Phones(HOST, sip_port, tmp_path, domain, passwords=passwords)
        yield Platform(service, phones, watch, tmp_path, kam)
        nursery.cancel_scope.cancel()


async def late_iphone(
    p: Platform, user: str, desk: str | Path, call_id: str, *, caller_name: str = "Alice", **iphone: Any
) -> tuple[Outcome | None, Path]:
    """A desk phone handles the call (answers, rings or declines), then the
    user's iPhone registers after it ended; returns the fake call's outcome
    and the iPhone's log."""
    log = p.folder / f"iphone-{user}.log"
    ua = iphone.pop("ua", IPHONE_UA)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(p.phones.phone, user, DESK_UA, "desk", desk, 4000, p.folder / f"desk-{user}.log")
        await p.registered(user)
        await p.phones.call("alice", caller_name, user, call_id)
        nursery.start_soon(partial(p.phones.phone, user, ua, "iphone", "phone_rings", 2500, log, **iphone))
        outcome = await p.watch.outcome(call_id, timeout=10)
    return outcome, log


async def test_answered_elsewhere_late_iphone_gets_invite_and_cancel_with_reason(tmp_path: Path) -> None:
    async with platform(tmp_path) as p:
        call_id = "e2e-answered-1@127.0.0.1"
        outcome, iphone = await late_iphone(p, "bob", "phone_answers", call_id)
        assert outcome is Outcome.COMPLETED
        assert received(iphone) == (call_id, 'SIP;cause=200;text="Call completed elsewhere"')
        assert [(d.action.value, d.reason) for d in p.watch.decisions] == [("fake_call", "answered")]
        assert p.metric("evapi_worker_late_registrations_total", ended="answered") == 1


async def test_without_use_domain_the_fake_call_is_still_to_the_sip_domain(tmp_path: Path) -> None:
    # Accounts keyed by user alone (EVW_USE_DOMAIN=0, as Debian's stock
    # config has use_domain 0): the To header still names the SIP domain
    # the caller dialled, not the node's address.
    async with platform(tmp_path, defines=("EVW_USE_DOMAIN=0",)) as p:
        call_id = "e2e-no-use-domain@127.0.0.1"
        outcome, iphone = await late_iphone(p, "bob", "phone_answers", call_id)
        assert outcome is Outcome.COMPLETED
        assert received(iphone) == (call_id, 'SIP;cause=200;text="Call completed elsewhere"')
        [invite] = [line for line in iphone.read_text().splitlines() if line.startswith("invite ")]
        assert f"to= <sip:bob@{DOMAIN}>" in invite, invite
        assert [(d.action.value, d.reason) for d in p.watch.decisions] == [("fake_call", "answered")]


async def test_missed_call_late_iphone_gets_cancel_without_reason(tmp_path: Path) -> None:
    async with platform(tmp_path) as p:
        call_id = "e2e-missed-1@127.0.0.1"
        # The desk phone only rings; alice gives up after 2.5 s.
        outcome, iphone = await late_iphone(p, "carol", "phone_rings", call_id)
        assert outcome is Outcome.COMPLETED
        assert received(iphone) == (call_id, None)
        assert [(d.action.value, d.reason) for d in p.watch.decisions] == [("fake_call", "missed")]


async def test_iphone_registering_while_it_rings_gets_the_real_call_from_tsilo(tmp_path: Path) -> None:
    async with platform(tmp_path) as p:
        call_id = "e2e-ringing-1@127.0.0.1"
        iphone = tmp_path / "iphone.log"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(p.phones.phone, "dave", DESK_UA, "desk", "phone_rings", 6000, tmp_path / "desk.log")
            await p.registered("dave")
            nursery.start_soon(p.phones.call, "alice", "Alice", "dave", call_id)
            await p.events("call_start")  # the call rings on the desk phone now
            nursery.start_soon(p.phones.phone, "dave", IPHONE_UA, "iphone", "phone_rings", 4000, iphone)
        # tsilo added the iPhone as a branch: it got the real INVITE, then the
        # real CANCEL when alice gave up; the worker did nothing.
        assert received(iphone) == (call_id, None)
        assert [(d.action.value, d.reason) for d in p.watch.decisions] == [("none", "ringing")]
        assert p.metric("evapi_worker_fake_calls_total", outcome="completed") == 0


async def test_declined_elsewhere_late_iphone_gets_busy_everywhere(tmp_path: Path) -> None:
    async with platform(tmp_path) as p:
        call_id = "e2e-declined-1@127.0.0.1"
        outcome, iphone = await late_iphone(p, "erin", SCENARIOS / "phone_declines.xml", call_id)
        assert outcome is Outcome.COMPLETED
        assert received(iphone) == (call_id, 'SIP;cause=600;text="Busy Everywhere"')
        assert p.metric("evapi_worker_late_registrations_total", ended="declined") == 1


async def test_after_the_window_and_non_push_devices_get_nothing(tmp_path: Path) -> None:
    async with platform(tmp_path, window=0.5) as p:
        call_id = "e2e-toolate-1@127.0.0.1"
        iphone, late_desk = tmp_path / "iphone.log", tmp_path / "desk2.log"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(p.phones.phone, "fred", DESK_UA, "desk", "phone_answers", 3000, tmp_path / "desk.log")
            await p.registered("fred")
            await p.phones.call("alice", "Alice", "fred", call_id)
            await trio.sleep(1.0)  # beyond the 0.5 s window
            nursery.start_soon(p.phones.phone, "fred", IPHONE_UA, "iphone", "phone_rings", 1500, iphone)
            nursery.start_soon(p.phones.phone, "fred", DESK_UA, "desk-2", "phone_rings", 1500, late_desk)
        assert received(iphone) == (None, None)
        assert received(late_desk) == (None, None)
        assert [d for d in p.watch.decisions if d.action.value != "none"] == []
        # Only the iPhone's REGISTERs (register, unregister) made events: desk
        # phones cost the worker nothing.
        with trio.fail_after(3):  # the unregistration's event may trail the phone's exit
            while p.metric("evapi_worker_events_total", node="e2e", type="register") < 2:
                await trio.sleep(0.05)
        await trio.sleep(0.3)
        assert p.metric("evapi_worker_events_total", node="e2e", type="register") == 2


async def test_two_iphones_on_one_account_get_one_fake_call_each(tmp_path: Path) -> None:
    async with platform(tmp_path) as p:
        call_id = "e2e-two-1@127.0.0.1"
        logs = [tmp_path / "iphone-a.log", tmp_path / "iphone-b.log"]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(p.phones.phone, "gina", DESK_UA, "desk", "phone_answers", 5000, tmp_path / "desk.log")
            await p.registered("gina")
            await p.phones.call("alice", "Alice", "gina", call_id)
            for name, log in zip(("iphone-a", "iphone-b"), logs, strict=True):
                nursery.start_soon(p.phones.phone, "gina", IPHONE_UA, name, "phone_rings", 2500, log)
        for log in logs:
            assert received(log) == (call_id, 'SIP;cause=200;text="Call completed elsewhere"')
        assert sorted(d.device for d in p.watch.decisions) == ["urn:uuid:iphone-a", "urn:uuid:iphone-b"]
        assert p.metric("evapi_worker_fake_calls_total", outcome="completed") == 2


async def test_iphone_on_tcp_gets_the_fake_call_over_its_own_connection(tmp_path: Path) -> None:
    async with platform(tmp_path) as p:
        call_id = "e2e-tcp-1@127.0.0.1"
        outcome, iphone = await late_iphone(p, "hank", "phone_answers", call_id, transport="t1")
        assert outcome is Outcome.COMPLETED
        assert received(iphone) == (call_id, 'SIP;cause=200;text="Call completed elsewhere"')
        (decision,) = p.watch.decisions
        assert isinstance(decision, Act) and decision.register.proto == "tcp"


async def test_message_strategy_tells_the_late_device_by_sip_message(tmp_path: Path) -> None:
    async with platform(tmp_path, strategy=Strategy.MESSAGE) as p:
        call_id = "e2e-message-1@127.0.0.1"
        iphone = tmp_path / "iphone.log"
        takes_message = SCENARIOS / "phone_message.xml"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(p.phones.phone, "ivy", DESK_UA, "desk", "phone_answers", 4000, tmp_path / "desk.log")
            await p.registered("ivy")
            await p.phones.call("alice", "Alice", "ivy", call_id)
            nursery.start_soon(p.phones.phone, "ivy", IPHONE_UA, "iphone", takes_message, 2000, iphone)
            outcome = await p.watch.outcome(call_id, timeout=10)
        assert outcome is not None and outcome.value == "completed"
        assert iphone.read_text().splitlines() == [f"message body=call-ended;call-id={call_id};reason=answered"]


async def test_only_device_an_asleep_iphone_call_is_held_then_cancelled_then_late_register(tmp_path: Path) -> None:
    async with platform(tmp_path) as p:
        call_id = "e2e-held-1@127.0.0.1"
        first, late = tmp_path / "iphone-first.log", tmp_path / "iphone-late.log"
        # The iPhone registered once (Kamailio learns the account has a push
        # device), then went to sleep: unregistered, no contact online.
        await p.phones.phone("jack", IPHONE_UA, "iphone", "phone_rings", 200, first)
        p.watch.decisions.clear()
        caller_done = trio.Event()

        async def call() -> None:
            await p.phones.call("alice", "Alice", "jack", call_id)  # held (180), gives up after 2.5 s
            caller_done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call)
            with trio.fail_after(10):
                await caller_done.wait()
            nursery.start_soon(p.phones.phone, "jack", IPHONE_UA, "iphone", "phone_rings", 2000, late)
            outcome = await p.watch.outcome(call_id, timeout=10)
        assert outcome is not None and outcome.value == "completed"
        assert received(late) == (call_id, None)
        assert [(d.action.value, d.reason) for d in p.watch.decisions] == [("fake_call", "missed")]


async def test_only_device_an_asleep_iphone_waking_while_held_gets_the_real_call(tmp_path: Path) -> None:
    async with platform(tmp_path) as p:
        call_id = "e2e-held-2@127.0.0.1"
        iphone = tmp_path / "iphone.log"
        await p.phones.phone("kate", IPHONE_UA, "iphone", "phone_rings", 200, tmp_path / "first.log")
        p.watch.decisions.clear()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(p.phones.call, "alice", "Alice", "kate", call_id)
            await p.events("call_start")  # held: no contact online, the push went out
            nursery.start_soon(p.phones.phone, "kate", IPHONE_UA, "iphone", "phone_rings", 3500, iphone)
        # tsilo added the woken iPhone to the held call: the real INVITE, then
        # the caller's CANCEL.
        assert received(iphone) == (call_id, None)
        assert [(d.action.value, d.reason) for d in p.watch.decisions] == [("none", "ringing")]


async def test_quotes_and_backslashes_in_names_and_user_agents_survive_the_json(tmp_path: Path) -> None:
    async with platform(tmp_path) as p:
        call_id = "e2e-quotes-1@127.0.0.1"
        name = 'Alice \\"The Boss\\" O\\\\Hara'  # as written in the From header
        ua = 'LinphoneiOS/5.2 "beta" C:\\build\\'
        outcome, iphone = await late_iphone(p, "lena", "phone_answers", call_id, caller_name=name, ua=ua)
        assert outcome is Outcome.COMPLETED
        assert p.metric("evapi_worker_event_errors_total", node="e2e", reason="invalid_json") == 0
        (decision,) = p.watch.decisions
        assert isinstance(decision, Act) and decision.register.user_agent == ua
        invite = iphone.read_text().splitlines()[0]
        assert f'from= "{name}" <sip:alice@caller.example.net>' in invite
