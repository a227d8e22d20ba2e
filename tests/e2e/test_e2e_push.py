"""The worker sends the push, end to end: real Kamailio (the bundled
config), real SIPp phones and callers, and the APNs stand-in (a real HTTP/2
server over TLS that checks what Apple checks) that the production client
reaches by ``url`` and ``ca_file``. The stand-in wakes the phone as iOS
does: the phone registers once it was pushed."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

from evapi_worker.capture import CaptureSettings
from evapi_worker.cli import main
from evapi_worker.config import Config
from evapi_worker.core.outcomes import Outcome
from evapi_worker.lab.phones import IPHONE_UA, Phones, received
from evapi_worker.lab.push_standin import ApnsStandIn, ReceivedPush
from evapi_worker.service import Service

from ..e2e_platform import DOMAIN, HOST, Platform, needs_platform, platform
from ..helpers import FAST_RECONNECT, running_demo
from ..linphone import Linphone, needs_linphonec
from ..push_services import start_standins
from ..sipp_device import GIVES_UP, PHONES, SCENARIOS, free_port, free_sip_port
from .test_e2e_dialogs import CALLER_SAW, PHONE_SAW, call_in_progress, lines
from .test_e2e_field import linphone
from .test_e2e_workers import address, kamailio, total

pytestmark = needs_platform

TOKEN = "c0ffee" * 10 + "abcd"  # the iPhone's VoIP token (64 hex digits), also its +sip.instance


@dataclass
class Pushed:
    p: Platform
    apns: ApnsStandIn


@asynccontextmanager
async def pushed_platform(
    tmp_path: Path, *, tls: bool = False, capture: CaptureSettings | None = None, expiration: int = 30,
    **engine: Any,
) -> AsyncIterator[Pushed]:  # fmt: skip
    """The platform, its worker pushing through the stand-ins (pushes kept
    ``expiration`` seconds for an offline phone)."""
    async with trio.open_nursery() as nursery:
        standins = await start_standins(nursery, tmp_path / "push")
        push = msgspec.structs.replace(standins.settings, expiration=expiration)
        async with platform(tmp_path, push=push, tls=tls, capture=capture, **engine) as p:
            yield Pushed(p, standins.apns)
        nursery.cancel_scope.cancel()


async def iphone_goes_to_sleep(p: Platform, user: str) -> None:
    """The iPhone registers with its push parameters, then its app is
    suspended: the registration stays, nothing answers at its address."""
    log = p.folder / f"asleep-{user}.log"
    await p.phones.phone(user, IPHONE_UA, TOKEN, "phone_rings", 300, log, register=PHONES / "iphone_push_sleeps.xml")
    with trio.fail_after(5):
        while p.metric("evapi_worker_push_devices") < 1:
            await trio.sleep(0.05)


def wakes_when_pushed(
    s: Pushed, nursery: trio.Nursery, user: str, after: float, scenario: Path | str, log: Path
) -> list[ReceivedPush]:
    """Like iOS: a push reaches the phone, and ``after`` seconds later its
    app has registered again (from a new address) and handles calls."""
    pushes: list[ReceivedPush] = []

    async def wake() -> None:
        await trio.sleep(after)
        await s.p.phones.phone(
            user, IPHONE_UA, TOKEN, scenario, 6000, log, register=PHONES / "iphone_push_register.xml"
        )

    def on_push(push: ReceivedPush) -> None:
        pushes.append(push)
        nursery.start_soon(wake)

    s.apns.on_push = on_push
    return pushes


async def test_a_pushed_iphone_wakes_in_time_answers_and_completes_its_dialog(tmp_path: Path) -> None:
    call_id = "pushed-in-time@caller.example.net"
    async with pushed_platform(tmp_path) as s:
        p = s.p
        await iphone_goes_to_sleep(p, "bob")
        iphone, caller = tmp_path / "iphone.log", tmp_path / "caller.log"
        async with trio.open_nursery() as nursery:
            pushes = wakes_when_pushed(s, nursery, "bob", 0.5, SCENARIOS / "phone_dialog.xml", iphone)
            code = await p.phones.call("alice", "Alice", "bob", call_id, SCENARIOS / "caller_dialog.xml", log=caller,
                                       timeout=30)  # fmt: skip
        latency = p.metric("evapi_worker_push_latency_seconds_sum", provider="apns")
    # One push, valid (the stand-in checked the JWT, headers and payload),
    # with the call's Call-ID, a few milliseconds after Kamailio's INVITE.
    assert [(x.token, x.call_id, x.status) for x in pushes] == [(TOKEN, call_id, 200)]
    assert pushes[0].payload["from-uri"].startswith("sip:alice@")
    assert 0 < latency < 0.25, latency
    # The woken phone got the real call, answered, and the dialog completed.
    assert code == 0, (lines(caller), lines(iphone))
    phone = lines(iphone)
    assert phone[0] == f"invite call_id= {call_id}" and phone[1:] == PHONE_SAW, phone
    assert lines(caller)[1:] == CALLER_SAW
    assert p.metric("evapi_worker_fake_calls_total", outcome="completed") == 0
    assert p.metric("evapi_worker_push_wakeup_seconds_count") == 1


async def test_a_pushed_iphone_that_wakes_after_the_caller_gave_up_gets_the_fake_call(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    call_id = "pushed-too-late@caller.example.net"
    capture = CaptureSettings(tmp_path / "capture")
    async with pushed_platform(tmp_path, capture=capture) as s:
        p = s.p
        await iphone_goes_to_sleep(p, "carol")
        iphone = tmp_path / "iphone.log"
        async with trio.open_nursery() as nursery:
            pushes = wakes_when_pushed(s, nursery, "carol", 2.5, "phone_rings", iphone)
            # alice gives up after 1.5 s of ringing (the sleeping contact never answers).
            assert await p.phones.call("alice", "Alice", "carol", call_id, GIVES_UP, timeout=20) == 0
            outcome = await p.watch.outcome(call_id, timeout=15)
        assert [x.call_id for x in pushes] == [call_id]
        assert outcome is Outcome.COMPLETED
        assert received(iphone) == (call_id, None)  # missed: the CANCEL says nothing more
        assert [(d.action.value, d.reason) for d in p.watch.decisions] == [("fake_call", "missed")]
    # The capture noted the push: its replay measures the wake-up from it
    # (the phone registered 2.5 s after the push reached the stand-in).
    capsys.readouterr()
    assert main(["replay", "--json", *map(str, sorted(capture.folder.iterdir()))]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])["summary"]
    woke = summary["push_wakeup_seconds"]
    assert woke["pushes"] == 1 and woke["registered_after_push"] == 1, summary
    assert 2.5 <= woke["p50"] < 3.5, woke
    assert summary["late_registrations"] == {"cancelled": 1}, summary


async def test_the_demo_with_push_wakes_its_iphones_through_the_apns_stand_in(tmp_path: Path) -> None:
    """The installed ``evapi-worker demo --push``: its stories 3 and 4 are a
    sleeping iPhone pushed by the worker and woken in time (the real call,
    answered) and one woken too late (the fake call, missed)."""
    sip, evapi = free_sip_port(), free_port(socket.SOCK_STREAM)
    out = tmp_path / "demo.out"
    async with running_demo(
        out, "--push", "--metrics", "off", "--sip", f"{HOST}:{sip}", "--evapi", f"{HOST}:{evapi}", ready_within=60
    ):
        text = out.read_text()
    pushed = re.findall(r"APNs \(stand-in\) got a VoIP push for Call-ID (\S+), signed", text)
    assert len(pushed) == 2, text
    assert f"the iPhone rang with the real call (Call-ID {pushed[0]}), answered" in text, text
    assert f"the iPhone received an INVITE with Call-ID {pushed[1]} and a CANCEL without Reason" in text, text
    assert "fake call (missed); outcome: completed" in text, text


async def test_two_workers_push_each_device_once_and_an_android_phone_gets_its_push_only(tmp_path: Path) -> None:
    # An iPhone and an Android phone of one account, both asleep; two
    # workers hear the call. The node's claims let one worker push each
    # device; the caller gives up and nobody wakes: no fake call either
    # (Android apps get their calls, this worker calls only iPhones late).
    call_id = "two-workers@caller.example.net"
    kam = kamailio(tmp_path / "k", "pushnode")
    async with trio.open_nursery() as outer:
        standins = await start_standins(outer, tmp_path / "push")
        async with kam.running(), trio.open_nursery() as nursery:
            workers = []
            for _ in range(2):
                config = Config(nodes=(address(kam),), evapi=FAST_RECONNECT, push=standins.settings)
                worker = Service(config)
                await nursery.start(worker.run)
                workers.append(worker)
            with trio.fail_after(10):
                while not all(c.connected for w in workers for c in w.connections.values()):
                    await trio.sleep(0.02)
            phones = Phones(HOST, kam.sip_port, tmp_path, DOMAIN)
            asleep = tmp_path / "asleep.log"
            await phones.phone(
                "dana", IPHONE_UA, TOKEN, "phone_rings", 300, asleep, register=PHONES / "iphone_push_sleeps.xml"
            )
            await phones.phone("dana", "LinphoneAndroid/5.2", "androidtoken1", "phone_rings", 300, asleep,
                               register=SCENARIOS / "android_push_sleeps.xml")  # fmt: skip
            with trio.fail_after(5):
                while total(workers, "evapi_worker_push_devices") < 4:
                    await trio.sleep(0.05)
            assert await phones.call("alice", "Alice", "dana", call_id, GIVES_UP, timeout=20) == 0
            with trio.fail_after(10):
                while total(workers, "evapi_worker_pushes_total", provider="fcm", result="sent") < 1:
                    await trio.sleep(0.05)
            await trio.sleep(1)  # and nothing more
            nursery.cancel_scope.cancel()
        outer.cancel_scope.cancel()
    assert [(x.token, x.call_id) for x in standins.apns.received] == [(TOKEN, call_id)]
    assert [(x.token, x.call_id) for x in standins.fcm.received] == [("androidtoken1", call_id)]
    for provider in ("apns", "fcm"):
        assert total(workers, "evapi_worker_pushes_total", provider=provider, result="sent") == 1
        assert total(workers, "evapi_worker_pushes_total", provider=provider, result="taken") == 1
    assert total(workers, "evapi_worker_fake_calls_sent_total") == 0


@needs_linphonec
async def test_linphone_woken_by_the_push_answers_over_tls_and_keeps_a_completed_call(tmp_path: Path) -> None:
    """The woken phone is liblinphone over TLS, registering with the same
    push parameters as the suspended app: the push brings it up, it gets the
    real call and answers; its own call history has a successful call."""
    call_id = "pushed-linphone@caller.example.net"
    async with pushed_platform(tmp_path, tls=True) as s:
        p = s.p
        await iphone_goes_to_sleep(p, "quinn")
        phone: Linphone = linphone(p, "quinn", "tls")
        phone.auto_answer, phone.push_token = True, f"{TOKEN}:voip"
        pushed = trio.Event()
        s.apns.on_push = lambda push: pushed.set()
        caller_log = tmp_path / "caller.log"
        async with trio.open_nursery() as nursery:
            code = await call_in_progress(p, nursery, "quinn", call_id, SCENARIOS / "caller_dialog.xml", caller_log)
            with trio.fail_after(5):
                await pushed.wait()
            async with phone.running():  # the app, woken by the push
                (log,) = await phone.wait_call_logs(timeout=20)
                duration = phone.call_duration(call_id)
        assert [x.call_id for x in s.apns.received] == [call_id]
        assert code == [0], lines(caller_log)
        assert (log.call_id, log.status) == (call_id, "success")
        assert duration is not None and duration >= 1


# -- a push delivered late: the phone shows the call from the delivery on --


@needs_linphonec
async def test_a_push_delivered_20_s_after_the_call_started_gives_linphone_the_missed_call(tmp_path: Path) -> None:
    """The phone was in a tunnel: Apple kept the push and delivered it 20 s
    after the call started, 18.5 s after the caller gave up (past the 15 s
    window from the start). The app shows the call and registers: it gets
    one INVITE with the call's Call-ID and a CANCEL without Reason; its own
    call history has the call, missed."""
    call_id = "pushed-in-a-tunnel@caller.example.net"
    async with pushed_platform(tmp_path, tls=True) as s:
        p = s.p
        await iphone_goes_to_sleep(p, "rosa")
        phone: Linphone = linphone(p, "rosa", "tls")
        phone.push_token, phone.instance = f"{TOKEN}:voip", TOKEN  # the same device (+sip.instance)
        s.apns.goes_offline(TOKEN)
        delivered = trio.Event()
        s.apns.on_push = lambda push: delivered.set()
        started = trio.current_time()
        assert await p.phones.call("alice", "Alice", "rosa", call_id, GIVES_UP, timeout=20) == 0
        assert [x.call_id for x in s.apns.received] == [call_id] and not delivered.is_set()
        await trio.sleep_until(started + 20)
        assert [x.call_id for x in s.apns.comes_online(TOKEN)] == [call_id]
        async with phone.running():  # the app, woken by the push
            outcome = await p.watch.outcome(call_id, timeout=15)
            (log,) = await phone.wait_call_logs(timeout=15)
        assert outcome is Outcome.COMPLETED
        assert (log.call_id, log.status) == (call_id, "missed")
        (decision,) = [d for d in p.watch.decisions if d.call_id == call_id]
        assert (decision.action.value, decision.reason) == ("fake_call", "missed")
        assert decision.since_start >= 20
        assert p.metric("evapi_worker_fake_calls_sent_total") == 1


async def test_a_push_kept_past_its_expiration_is_never_delivered_and_a_later_register_gets_nothing(
    tmp_path: Path,
) -> None:
    """Pushes kept 2 s for an offline phone, a 3 s window: the phone is back
    at 6 s, after the push expired (the stand-in drops it, as Apple does)
    and after the worker's deadline for it. It registers for its own
    reasons: no fake call, no INVITE."""
    call_id = "pushed-expired@caller.example.net"
    async with pushed_platform(tmp_path, expiration=2, window=3.0) as s:
        p = s.p
        await iphone_goes_to_sleep(p, "sven")
        s.apns.goes_offline(TOKEN)
        delivered: list[ReceivedPush] = []
        s.apns.on_push = delivered.append
        started = trio.current_time()
        assert await p.phones.call("alice", "Alice", "sven", call_id, GIVES_UP, timeout=20) == 0
        await trio.sleep_until(started + 6)
        assert s.apns.comes_online(TOKEN) == [] and [x.call_id for x in s.apns.expired] == [call_id]
        iphone = tmp_path / "iphone.log"
        # Registered 4 s (a fake call would have come by then), then unregistered.
        await p.phones.phone("sven", IPHONE_UA, TOKEN, "phone_rings", 4000, iphone,
                             register=PHONES / "iphone_push_register.xml")  # fmt: skip
        assert delivered == []
        assert received(iphone) == (None, None)
        assert [d for d in p.watch.decisions if d.call_id == call_id and d.action.value != "none"] == []
        assert p.metric("evapi_worker_fake_calls_sent_total") == 0
