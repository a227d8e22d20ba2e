"""End to end: real Kamailio (the bundled config), the worker, real SIPp phones."""

from __future__ import annotations

from pathlib import Path

import trio

from evapi_worker.core.engine import Act, Strategy
from evapi_worker.core.outcomes import Outcome
from evapi_worker.lab.phones import DESK_UA, IPHONE_UA, received

from ..e2e_platform import DOMAIN, late_iphone, needs_platform, platform
from ..sipp_device import SCENARIOS

pytestmark = needs_platform


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
