"""No account can hurt another: what one ordinary account can do, tried
with real Kamailio (the bundled config), the real worker and real SIPp
phones, costs only that account.

- a REGISTER flood to an account with held calls: Kamailio keeps answering
  at once, its log stays small, another account's late iPhone is served;
- a stranger's call with another call's Call-ID ends or swallows nothing;
- an account's flood of push contacts silences no one else's pushes;
- phones that ring and never answer the CANCEL, many of them, on many
  accounts, do not keep another account's late iPhone waiting.
"""

from __future__ import annotations

import subprocess
from functools import partial
from pathlib import Path

import pytest
import trio

from bench import burst
from evapi_worker.config import PushSettings
from evapi_worker.core.outcomes import Outcome
from evapi_worker.lab.kamailio_process import Subscriber
from evapi_worker.lab.phones import IPHONE_UA, received

from ..e2e_platform import DOMAIN, HOST, Platform, needs_platform, platform
from ..push_services import start_standins
from ..sipp_device import SCENARIOS, free_port
from .test_e2e_push import TOKEN, iphone_goes_to_sleep
from .test_e2e_stall import metrics_lines, options_rtt

pytestmark = needs_platform

RINGING_PHONES = burst.HERE / "phone_rings_late.xml"


async def sample(port: int, series: str) -> float:
    """One series of a worker's /metrics (0 when absent)."""
    for line in await metrics_lines(port):
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def callers_hold(folder: Path, sip_port: int, name: str, calls: int, hold_ms: int) -> trio.Process:
    """``calls`` calls at once to the account ``target``, each on the line
    ``hold_ms`` (held or ringing) before its caller gives up; their SIPp
    logs "held" or "refused" (480 at once) in ``name``.log."""
    return await burst.sipp(
        folder, name, sip_port, "-sf", str(SCENARIOS / "callers_hold.xml"),
        "-m", str(calls), "-r", "1000", "-l", str(calls), "-key", "callee", "target", "-key", "caller_domain",
        "caller.example.net", "-key", "hold_ms", str(hold_ms), "-cid_str", f"{name}-%u@caller.example.net",
        "-default_behaviors", "all,-abortunexp", "-timeout", "60",
    )  # fmt: skip


async def emitted(p: Platform) -> int:
    """Events the node has emitted so far: its counter, as kamcmd reads it."""
    reply = await trio.run_process(
        ["kamcmd", "-s", p.kamailio.control, "htable.get", "evw", "seq"], capture_stdout=True, check=False
    )
    return int(reply.stdout.decode().split("value: ")[1].split()[0])


def count_lines(log: Path, start: str) -> int:
    return sum(line.startswith(start) for line in log.read_text(errors="replace").splitlines()) if log.exists() else 0


async def test_a_register_flood_to_an_account_with_held_calls_stalls_no_one(tmp_path: Path) -> None:
    # Sixteen calls held for one account (its bound raised to hold them
    # all), then 300 REGISTERs a second for 10 s to that account, of as many
    # push devices as it may have. Each REGISTER used to add every contact of the
    # account to every held call, tm logging an error for each past its
    # branch limit: a gigabyte of log in ten seconds, OPTIONS answered in
    # 0.7 s, another account's fake call 9.6 s after its REGISTER.
    defines = ("EVW_MAX_HELD_PER_ACCOUNT=16", "EVW_PUSH_HOLD=60")
    async with burst.platform(tmp_path, defines=defines) as (sip_port, _, metrics_port):
        holders = await callers_hold(tmp_path, sip_port, "holders", 16, 25000)
        with trio.fail_after(10):
            while count_lines(tmp_path / "holders.log", "held ") < 16:
                await trio.sleep(0.05)
        assert (await options_rtt((HOST, sip_port)))[0] < 0.05
        # As many devices as the registrar lets the account have (twelve),
        # registered again and again.
        (tmp_path / "devices.csv").write_text("SEQUENTIAL\n" + "".join(f"{n};\n" for n in range(12)))
        flood = await burst.sipp(
            tmp_path, "flood", sip_port, "-sf", str(SCENARIOS / "register_flood_account.xml"),
            "-inf", str(tmp_path / "devices.csv"),
            "-oocsf", str(RINGING_PHONES), "-key", "user", "target", "-key", "ring_delay", "0",
            "-key", "ignore_cancel", "0", "-m", "3000", "-r", "300", "-l", "3000", "-timeout", "40",
            "-default_behaviors", "all,-abortunexp",
        )  # fmt: skip
        probes: list[tuple[float, int]] = []
        async with trio.open_nursery() as nursery:

            async def bobs_late_iphone() -> None:
                # Three seconds into the flood: a missed call to bob, then his iPhone wakes.
                await trio.sleep(3)
                await burst.missed_calls(tmp_path, sip_port, ["bob"])
                [phone] = await burst.devices_wake(tmp_path, sip_port, [[("bob", "bob-iphone")]], 0, 4000, name="bob")
                await phone.wait()

            nursery.start_soon(bobs_late_iphone)
            with trio.fail_after(60):
                while flood.poll() is None:
                    probes.append(await options_rtt((HOST, sip_port)))
                    await trio.sleep(0.1)
        assert flood.returncode == 0
        refused = {
            reason: await sample(metrics_port, f'evapi_worker_sip_refused_total{{node="crowd",reason="{reason}"}}')
            for reason in ("too_many_branches", "wake_rate")
        }
        holders.terminate()
        await holders.wait()
    # Kamailio answered at once all along, and said little about it.
    assert len(probes) >= 50, probes
    assert all(sends == 1 for _, sends in probes), probes
    worst = max(rtt for rtt, _ in probes)
    assert worst < 0.05, f"OPTIONS answered in up to {worst * 1000:.0f} ms under the flood"
    log_mib = (tmp_path / "kamailio.log").stat().st_size / 2**20
    assert log_mib < 10, f"Kamailio logged {log_mib:.1f} MiB"
    # bob's iPhone got its fake call at once.
    bob = burst.read_phones([tmp_path / "bob-0.log"])
    [(got, at)] = bob.invites["bob-iphone"]
    assert got == burst.call_id(0)
    assert (at - bob.registered["bob-iphone"]) / 1000 < 1.0
    # The bounds that held: each call offered EVW_MAX_BRANCHES devices at most,
    # EVW_WAKE_RATE REGISTERs a second (each counted once, not per REGISTER).
    assert refused["too_many_branches"] >= 1 and 1 <= refused["wake_rate"] <= 12, refused


# -- a Call-ID is the caller's choice ------------------------------------------

SHARED = "shared-call-id@caller.example.net"


async def test_a_strangers_call_with_your_call_id_and_its_cancel_end_nothing_of_yours(tmp_path: Path) -> None:
    # Alice calls bob (held: his iPhone sleeps); Mallory calls carol with the
    # same Call-ID and gives up. Bob's iPhone wakes while alice's call still
    # rings: it gets alice's real call, and no fake call for a call that did
    # not end.
    iphone = tmp_path / "iphone.log"
    async with platform(tmp_path) as p:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                partial(p.phones.call, "alice", "Alice", "bob", SHARED, SCENARIOS / "caller_cancels.xml")
            )
            await p.events("call_start", 1)
            # Held (carol's phone sleeps too), then given up. (Kamailio answers
            # the CANCEL of a held call after its 487: SIPp's caller counts
            # that order as a failure, the events say what happened.)
            await p.phones.call("mallory", "Mallory", "carol", SHARED)
            await p.events("call_cancelled", 1)
            await p.phones.phone("bob", IPHONE_UA, "iphone", "phone_rings", 3500, iphone)
        assert [(d.action.value, d.reason) for d in p.watch.decisions] == [("none", "ringing")]
        assert [d.aor for d in p.watch.decisions] == [f"bob@{DOMAIN}"]
        assert p.metric("evapi_worker_fake_calls_sent_total") == 0
    assert received(iphone) == (SHARED, None)  # alice's INVITE, then her own CANCEL
    assert f"evw: fake call {SHARED}" not in p.kamailio.log.read_text()


async def test_a_strangers_call_first_does_not_swallow_yours(tmp_path: Path) -> None:
    # Mallory's call with the Call-ID comes first and ends; alice's real call
    # to bob, with the same Call-ID, is missed; bob's iPhone wakes late.
    iphone = tmp_path / "iphone.log"
    async with platform(tmp_path) as p:
        await p.phones.call("mallory", "Mallory", "carol", SHARED)
        await p.phones.call("alice", "Alice", "bob", SHARED)
        await p.events("call_cancelled", 2)
        await p.phones.phone("bob", IPHONE_UA, "iphone", "phone_rings", 2500, iphone)
        assert await p.watch.outcome(SHARED, timeout=10) is Outcome.COMPLETED
        assert [(d.action.value, d.reason) for d in p.watch.decisions] == [("fake_call", "missed")]
        assert [d.aor for d in p.watch.decisions] == [f"bob@{DOMAIN}"]
    assert received(iphone) == (SHARED, None)


async def test_a_call_sharing_a_call_id_that_ended_is_still_pushed(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        standins = await start_standins(nursery, tmp_path / "push")
        async with platform(tmp_path, push=standins.settings) as p:
            await iphone_goes_to_sleep(p, "bob")
            await p.phones.call("mallory", "Mallory", "carol", SHARED)
            await p.phones.call("alice", "Alice", "bob", SHARED)
            with trio.fail_after(5):
                while p.metric("evapi_worker_pushes_total", provider="apns", result="sent") < 1:
                    await trio.sleep(0.05)
            assert p.metric("evapi_worker_pushes_total", provider="apns", result="ended") == 0
        nursery.cancel_scope.cancel()
    assert [(x.token, x.call_id, x.status) for x in standins.apns.received] == [(TOKEN, SHARED, 200)]


# -- one account's push contacts ------------------------------------------------

CONTACTS_A_BATCH = 100
CONTACTS_A_REGISTER = 10


def batch_scenario(folder: Path) -> Path:
    """Mallory's flood, one SIPp call a batch: ten REGISTERs of ten new push
    contacts each (each contact its own +sip.instance and token), then
    Contact: * to remove them all, every REGISTER with digest credentials."""

    def contacts(first: int) -> str:
        return "\n".join(
            f"Contact: <sip:m[call_number]x{k}@[local_ip]:[local_port];transport=[transport];pn-provider=apns;"
            f"pn-prid=abcdef0123456789abcdef0123456789[call_number]{k:03d}:voip;pn-param=ABCDE12345.org.flood.voip>"
            f';+sip.instance="<urn:uuid:m[call_number]x{k}>"'
            for k in range(first, first + CONTACTS_A_REGISTER)
        )

    def register(cseq: int, contact: str, auth: bool, answer: str) -> str:
        return f"""  <send retrans="500">
    <![CDATA[

REGISTER sip:[domain] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
From: <sip:mallory@[domain]>;tag=[pid]m[call_number]
To: <sip:mallory@[domain]>
Call-ID: [call_id]
CSeq: {cseq} REGISTER
{contact}
{"[authentication]" + chr(10) if auth else ""}User-Agent: LinphoneiOS/5.2.5 (iPhone; iOS 17.4) LinphoneSDK/5.3.0
Expires: {600 if contact != "Contact: *" else 0}
Max-Forwards: 70
Content-Length: 0

]]>
  </send>
  <recv response="{answer}"{' auth="true"' if answer == "401" else ""}/>
"""

    steps = [register(1, contacts(0), False, "401")]
    steps += [
        register(2 + n, contacts(n * CONTACTS_A_REGISTER), True, "200")
        for n in range(CONTACTS_A_BATCH // CONTACTS_A_REGISTER)
    ]
    steps.append(register(2 + CONTACTS_A_BATCH // CONTACTS_A_REGISTER, "Contact: *", True, "200"))
    path = folder / "push_contacts_flood.xml"
    path.write_text(
        '<?xml version="1.0" encoding="UTF-8" ?>\n<scenario name="push contacts flood">\n' + "".join(steps)
        + "</scenario>\n"
    )  # fmt: skip
    return path


async def test_one_accounts_flood_of_push_contacts_silences_no_one_else(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Mallory registers 101,000 push contacts, a hundred at a time, each
    # batch removed with Contact: *. The worker's push book once filled up
    # with them and dropped bob's iPhone, silently.
    batches = 1010
    accounts = tuple(Subscriber(user, f"{user}-secret") for user in ("bob", "mallory"))
    async with trio.open_nursery() as nursery:
        standins = await start_standins(nursery, tmp_path / "push")
        # A hundred contacts a REGISTER: the registrar's bound raised from twelve.
        defines = (f"EVW_ACCOUNT_CONTACTS={CONTACTS_A_BATCH}",)
        async with platform(tmp_path, push=standins.settings, subscribers=accounts, defines=defines) as p:
            await iphone_goes_to_sleep(p, "bob")
            started = trio.current_time()
            flood = await trio.run_process(
                [
                    "sipp", f"{HOST}:{p.kamailio.sip_port}", "-sf", str(batch_scenario(tmp_path)), "-t", "u1",
                    "-i", HOST, "-p", str(free_port()), "-key", "domain", DOMAIN,
                    "-au", "mallory", "-ap", "mallory-secret", "-m", str(batches), "-r", "1000", "-l", "1",
                    "-nostdin", "-timeout", "120", "-trace_err", "-error_file", str(tmp_path / "flood.errors"),
                ],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False, cwd=tmp_path,
            )  # fmt: skip
            flooding = trio.current_time() - started
            assert flood.returncode == 0, (tmp_path / "flood.errors").read_text(errors="replace")[-2000:]
            # Every event the node emitted was read (its counter is the last
            # event's number; none lost). A REGISTER's events are read from
            # the location table after registrar answered it, so the last
            # REGISTER of a batch often finds its contacts already removed by
            # the Contact: * its answer let through: ten events fewer, or
            # events stamped before the Contact: * but read after it, which
            # the push book knows to be over.
            node = p.service.config.nodes[0].name
            with trio.fail_after(60):
                while sum(p.service.metrics.events.counts.values()) < await emitted(p):
                    await trio.sleep(0.1)
            assert p.metric("evapi_worker_events_lost_total", node=node) == 0
            heard = p.metric("evapi_worker_events_total", node=node, type="register")
            assert heard > batches * (CONTACTS_A_BATCH - CONTACTS_A_REGISTER), heard
            # Every batch was freed by its Contact: *; what a batch held past
            # the account's share was mallory's own oldest, each counted.
            assert p.metric("evapi_worker_push_devices") == 1
            evicted = p.metric("evapi_worker_evictions_total", table="push_devices")
            share = PushSettings().max_devices_per_account
            most = batches * (CONTACTS_A_BATCH - share)  # every contact heard before its batch's Contact: *
            assert most / 2 < evicted <= most, evicted
            # bob's next call is pushed to his iPhone.
            await p.phones.call("alice", "Alice", "bob", "after-the-flood@caller.example.net", timeout=5)
            with trio.fail_after(5):
                while p.metric("evapi_worker_pushes_total", provider="apns", result="sent") < 1:
                    await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert [(x.token, x.call_id) for x in standins.apns.received] == [(TOKEN, "after-the-flood@caller.example.net")]
    # Logged naming mallory (her devices past her share, in the push book and
    # the engine's tables), a line per table and second at most.
    evictions = [r.getMessage() for r in caplog.records if r.getMessage().startswith("state evicted")]
    assert any("table=push_devices" in m for m in evictions), evictions
    assert all(f"accounts=mallory@{DOMAIN}:" in m and "more_accounts=0" in m for m in evictions), evictions
    assert len(evictions) <= 3 * (flooding + 2), (len(evictions), flooding)


# -- phones that never answer the CANCEL, on many accounts ----------------------


async def test_rude_phones_on_many_accounts_keep_no_other_accounts_late_iphone_waiting(tmp_path: Path) -> None:
    # 63 accounts, each with 16 phones that ring and never answer the CANCEL:
    # 1,008 fake calls for the 1,000 slots of the default settings. They
    # used to hold every slot for their CANCEL's full timeout while another
    # account's late iPhone went past its deadline.
    rude_accounts, devices = 63, 16
    polite = rude_accounts
    # Sixteen devices an account: the registrar's bound raised from twelve.
    defines = (f"EVW_ACCOUNT_CONTACTS={devices}",)
    async with burst.platform(tmp_path, defines=defines) as (sip_port, _, metrics_port):
        await burst.missed_calls(tmp_path, sip_port, [burst.account(a) for a in range(rude_accounts + 1)])
        await trio.sleep(0.5)
        groups = [[(burst.account(a), burst.device(a, d)) for a in range(rude_accounts)] for d in range(devices)]
        rude = await burst.devices_wake(tmp_path, sip_port, groups, 1500, 20000, ignore_cancel=True, name="rude")
        with trio.fail_after(30):
            while (running := await sample(metrics_port, "evapi_worker_sipp_running")) < 1000:
                await trio.sleep(0.02)
        [phone] = await burst.devices_wake(
            tmp_path, sip_port, [[(burst.account(polite), burst.device(polite, 0))]], 300, 3000, name="polite"
        )
        with trio.fail_after(30):
            await phone.wait()
            for process in rude:
                await process.wait()
        outcomes, _ = burst.scrape(metrics_port)
    assert running == 1000
    crowd = burst.read_phones([tmp_path / "polite-0.log"])
    me = burst.device(polite, 0)
    [(got, at)] = crowd.invites[me]
    assert got == burst.call_id(polite)
    assert (at - crowd.registered[me]) / 1000 < 1.0, "the polite iPhone waited behind the rude phones"
    assert crowd.cancels[me] == [(burst.call_id(polite), "")]
    # Every rude phone got its one fake call, each given up 2 s after its CANCEL.
    rude_seen = burst.read_phones([tmp_path / f"rude-{d}.log" for d in range(devices)])
    assert sum(len(calls) for calls in rude_seen.invites.values()) == rude_accounts * devices
    assert outcomes.get("gave_up") == rude_accounts * devices and outcomes.get("completed") == 1, outcomes


async def test_one_account_holds_a_few_calls_at_most_and_gives_each_back(tmp_path: Path) -> None:
    # Sixteen calls at once to an account whose phone sleeps: four are held
    # for its push (EVW_MAX_HELD_PER_ACCOUNT), the others answered 480 at once, pushed
    # to no one. Each held call gives its place back when it ends, however.
    async with burst.platform(tmp_path) as (sip_port, _, metrics_port):
        callers = await callers_hold(tmp_path, sip_port, "holders", 16, 1000)
        await callers.wait()
        log = tmp_path / "holders.log"
        assert (count_lines(log, "held "), count_lines(log, "refused ")) == (4, 12)
        refused = await sample(metrics_port, 'evapi_worker_sip_refused_total{node="crowd",reason="too_many_held"}')
        starts = await sample(metrics_port, 'evapi_worker_events_total{node="crowd",type="call_start"}')
        assert 1 <= refused <= 2 and starts == 4  # counted once a second; no call_start, so no push
        # Cancelled, the four gave their places back: four more are held.
        again = await callers_hold(tmp_path, sip_port, "again", 4, 500)
        await again.wait()
        assert count_lines(tmp_path / "again.log", "held ") == 4
