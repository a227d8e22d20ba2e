"""A call is done when its dialog is: for every path a call to an account
with a push device can take, the answering phone gets the ACK, a re-INVITE
in the dialog (hold) goes through both ways, and BYE from either side
reaches the other. Real Kamailio (the bundled config), real SIPp phones and
callers, over UDP, TCP, IPv6 and from behind NAT (a Contact nobody can
reach); TLS with linphonec, whose own call history is the truth.

The paths:
- held: the account has no contact online, the call is held while the
  push wakes the phone, and the phone registers (and answers) in time;
- forked: the call rings on a desk phone, the iPhone wakes up meanwhile, is
  added to the call and answers;
- late: the call ended, the iPhone gets the fake call and answers it at
  once (the race): the worker's ACK and BYE reach it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from evapi_worker.core.outcomes import Outcome
from evapi_worker.lab.phones import DESK_UA, IPHONE_UA, Phones, received

from ..e2e_platform import DOMAIN, EVENT_PATHS, Platform, needs_platform, platform
from ..linphone import Linphone, needs_linphonec
from ..sipp_device import SCENARIOS
from .test_e2e_field import linphone
from .test_e2e_ipv6 import V6

pytestmark = needs_platform

# What each side logs of a dialog the caller drives, and of one the phone
# drives (see the scenarios in tests/sipp).
PHONE_SAW = ["ack", "reinvite", "reinvite ack", "bye"]
CALLER_SAW = ["reinvite answered", "bye answered"]
PHONE_DROVE = ["ack", "reinvite answered", "bye answered"]
CALLER_ANSWERED = ["reinvite", "reinvite ack", "bye"]


def lines(log: Path) -> list[str]:
    try:
        return [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except FileNotFoundError:
        return []


@dataclass
class Dialog:
    caller_code: int | None
    caller: list[str]
    phone: list[str]
    desk: list[str]


async def call_in_progress(
    p: Platform, nursery: trio.Nursery, user: str, call_id: str, scenario: Path, log: Path
) -> list[int | None]:
    """alice calls ``user`` with ``scenario`` in ``nursery``; returns once the
    worker heard the call start. The list gets SIPp's exit code at the end."""
    code: list[int | None] = []

    async def call() -> None:
        code.append(await p.phones.call("alice", "Alice", user, call_id, scenario, log=log, timeout=30))

    nursery.start_soon(call)
    await p.events("call_start")
    return code


async def woken_in_time(
    p: Platform,
    user: str,
    call_id: str,
    *,
    forked: bool,
    phone_hangs_up: bool = False,
    transport: str = "u1",
    contact_host: str | None = None,
    phones: Phones | None = None,
) -> Dialog:
    """alice calls ``user``; 0.8 s into the call (held, or ringing on a desk
    phone when ``forked``) the iPhone registers and answers; the dialog then
    runs to its end, driven by the caller or by the phone."""
    phones = phones or p.phones
    iphone, desk = p.folder / f"iphone-{user}.log", p.folder / f"desk-{user}.log"
    caller_log = p.folder / f"caller-{user}.log"
    phone_side = SCENARIOS / ("phone_hangs_up.xml" if phone_hangs_up else "phone_dialog.xml")
    caller_side = SCENARIOS / ("caller_phone_hangs_up.xml" if phone_hangs_up else "caller_dialog.xml")
    async with trio.open_nursery() as nursery:
        if forked:
            nursery.start_soon(p.phones.phone, user, DESK_UA, "desk", "phone_rings", 8000, desk)
            await p.registered(user)
        code = await call_in_progress(p, nursery, user, call_id, caller_side, caller_log)
        await trio.sleep(0.8)  # the push wakes the phone
        nursery.start_soon(
            lambda: phones.phone(
                user, IPHONE_UA, "iphone", phone_side, 6000, iphone, transport=transport, contact_host=contact_host
            )
        )
    return Dialog(code[0], lines(caller_log), lines(iphone), lines(desk))


def assert_complete(d: Dialog, call_id: str, phone_hangs_up: bool) -> None:
    assert d.caller_code == 0, (d.caller, d.phone)
    assert d.phone[0] == f"invite call_id= {call_id}", d.phone
    if phone_hangs_up:
        assert d.phone[1:] == PHONE_DROVE, d.phone
        assert d.caller[1:] == CALLER_ANSWERED, d.caller
    else:
        assert d.phone[1:] == PHONE_SAW, d.phone
        assert d.caller[1:] == CALLER_SAW, d.caller
    # The answer reached alice with the proxy's Record-Route: her requests
    # within the dialog go through Kamailio.
    assert d.caller[0].startswith("answered record-route= <sip:"), d.caller
    assert ";lr" in d.caller[0]


@pytest.mark.parametrize(
    ("transport", "contact_host"),
    [("u1", None), ("t1", None), ("u1", "iphone.invalid"), ("t1", "iphone.invalid")],
    ids=["udp", "tcp", "udp-nat", "tcp-nat"],
)
async def test_held_call_woken_in_time_completes_its_dialog(
    tmp_path: Path, transport: str, contact_host: str | None
) -> None:
    async with platform(tmp_path) as p:
        call_id = f"dlg-held-{transport}-{contact_host}@caller.example.net"
        d = await woken_in_time(p, "kate", call_id, forked=False, transport=transport, contact_host=contact_host)
        assert_complete(d, call_id, phone_hangs_up=False)
        assert [(x.action.value, x.reason) for x in p.watch.decisions] == [("none", "ringing")]


async def test_held_call_woken_after_the_wait_timer_still_rings(tmp_path: Path) -> None:
    # tm keeps an idle transaction 5 s after the script leaves it; a held
    # call outlives that, up to EVW_PUSH_HOLD (30 s by default).
    async with platform(tmp_path) as p:
        call_id = "dlg-held-slow@caller.example.net"
        caller_log, iphone = tmp_path / "caller.log", tmp_path / "iphone.log"
        async with trio.open_nursery() as nursery:
            scenario = SCENARIOS / "caller_dialog.xml"
            code = await call_in_progress(p, nursery, "lena", call_id, scenario, caller_log)
            await trio.sleep(7)
            nursery.start_soon(
                p.phones.phone, "lena", IPHONE_UA, "iphone", SCENARIOS / "phone_dialog.xml", 5000, iphone
            )
        assert code == [0], lines(caller_log)
        assert lines(iphone)[1:] == PHONE_SAW


@pytest.mark.parametrize("redis", EVENT_PATHS)
async def test_held_call_the_phone_hangs_up(tmp_path: Path, redis: bool) -> None:
    async with platform(tmp_path, redis=redis) as p:
        call_id = f"dlg-held-phone-bye-{redis}@caller.example.net"
        d = await woken_in_time(p, "mia", call_id, forked=False, phone_hangs_up=True, contact_host="iphone.invalid")
        assert_complete(d, call_id, phone_hangs_up=True)


@pytest.mark.parametrize(
    ("transport", "contact_host", "phone_hangs_up"),
    [("u1", None, False), ("t1", "iphone.invalid", False), ("u1", "iphone.invalid", True)],
    ids=["udp", "tcp-nat", "udp-nat-phone-hangs-up"],
)
async def test_forked_call_woken_in_time_completes_its_dialog(
    tmp_path: Path, transport: str, contact_host: str | None, phone_hangs_up: bool
) -> None:
    async with platform(tmp_path) as p:
        call_id = f"dlg-forked-{transport}-{phone_hangs_up}@caller.example.net"
        d = await woken_in_time(
            p, "nina", call_id, forked=True, phone_hangs_up=phone_hangs_up, transport=transport,
            contact_host=contact_host,
        )  # fmt: skip
        assert_complete(d, call_id, phone_hangs_up)
        # The desk phone rang and was cancelled when the iPhone answered.
        assert received(p.folder / "desk-nina.log") == (call_id, 'SIP;cause=200;text="Call completed elsewhere"')


async def test_held_call_on_ipv6_completes_its_dialog(tmp_path: Path) -> None:
    async with platform(tmp_path, sip6=V6) as p:
        call_id = "dlg-held-v6@caller.example.net"
        v6 = Phones(V6, p.kamailio.sip_port, p.folder, DOMAIN)
        d = await woken_in_time(p, "olga", call_id, forked=False, phones=v6)
        assert_complete(d, call_id, phone_hangs_up=False)


@pytest.mark.parametrize("contact_host", [None, "iphone.invalid"], ids=["direct", "nat"])
@pytest.mark.parametrize("redis", EVENT_PATHS)
async def test_late_iphone_that_answers_the_fake_call_gets_its_ack_and_bye(
    tmp_path: Path, contact_host: str | None, redis: bool
) -> None:
    async with platform(tmp_path, redis=redis) as p:
        call_id = f"dlg-late-{contact_host}-{redis}@caller.example.net"
        iphone = tmp_path / "iphone.log"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(p.phones.phone, "pia", DESK_UA, "desk", "phone_answers", 4000, tmp_path / "desk.log")
            await p.registered("pia")
            await p.phones.call("alice", "Alice", "pia", call_id)
            answers = SCENARIOS / "phone_answers_at_once.xml"
            nursery.start_soon(
                lambda: p.phones.phone("pia", IPHONE_UA, "iphone", answers, 3000, iphone, contact_host=contact_host)
            )
            outcome = await p.watch.outcome(call_id, timeout=10)
        assert outcome is Outcome.ANSWERED
        assert lines(iphone) == [f"invite call_id= {call_id}", "ack", "bye"]


@needs_linphonec
@pytest.mark.parametrize("redis", EVENT_PATHS)
async def test_linphone_on_tls_woken_in_time_answers_and_keeps_a_completed_call(tmp_path: Path, redis: bool) -> None:
    """The phone is liblinphone over TLS: held, it registers 0.8 s into the
    call, answers, the caller puts it on hold and hangs up. Its call history
    has a successful call with a duration."""
    async with platform(tmp_path, tls=True, redis=redis) as p:
        call_id = "dlg-linphone-tls@caller.example.net"
        phone: Linphone = linphone(p, "quinn", "tls")
        phone.auto_answer = True
        caller_log = tmp_path / "caller.log"
        async with trio.open_nursery() as nursery:
            scenario = SCENARIOS / "caller_dialog.xml"
            code = await call_in_progress(p, nursery, "quinn", call_id, scenario, caller_log)
            await trio.sleep(0.8)
            async with phone.running():
                (log,) = await phone.wait_call_logs(timeout=20)
                duration = phone.call_duration(call_id)
        assert code == [0], lines(caller_log)
        assert (log.call_id, log.status) == (call_id, "success")
        assert duration is not None and duration >= 1  # alice talked 1.5 s
        assert lines(caller_log)[1:] == CALLER_SAW
