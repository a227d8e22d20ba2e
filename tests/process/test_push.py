"""The push: whom to push (RFC 8599 parameters as Linphone writes them),
and the production APNs and FCM clients against stand-ins that are real
HTTP/2 servers over TLS, checking what Apple and Google check."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio
import trio.testing
from prometheus_client import generate_latest

from evapi_worker.apns import ApnsSettings
from evapi_worker.config import Config, ConfigError, PushSettings
from evapi_worker.core.engine import Engine
from evapi_worker.core.events import CallStarted, Register
from evapi_worker.core.links import NodeAddress
from evapi_worker.core.push_answers import PushAnswer, PushResult
from evapi_worker.core.push_book import PushBook, PushJob, Refusal
from evapi_worker.lab.push_standin import (
    ApnsStandIn,
    FcmStandIn,
    make_apns_key,
)
from evapi_worker.metrics import Metrics
from evapi_worker.persistence import StateStore
from evapi_worker.pusher import Pusher, push_clients
from evapi_worker.service import Service

from ..helpers import Wire
from ..push_services import KEY_ID, TEAM, start_standins

T0 = 1_700_000_000.0
TOKEN = "a1" * 32  # an APNs VoIP token: 64 hex digits


def register(wire: Wire, ts: float, **kw: Any) -> Register:
    event = wire.register(ts, **kw)
    assert isinstance(event, Register)
    return event


def linphone_ios(wire: Wire, ts: float, token: str = TOKEN, **kw: Any) -> Register:
    """A REGISTER as Linphone's iOS app writes it."""
    fields = {
        "pn_provider": "apns",
        "pn_prid": f"{'f0' * 32}:remote&{token}:voip",
        "pn_param": f"{TEAM}.org.linphone.phone.remote&voip",
        **kw,
    }
    return register(wire, ts, **fields)


def test_the_book_reads_linphone_s_parameters_and_pushes_each_live_device() -> None:
    wire, book = Wire(), PushBook()
    book.register(linphone_ios(wire, T0), 0.0)
    book.register(register(wire, T0, instance="<urn:uuid:android>", pn_provider="fcm", pn_prid="fcm-tok_1:x"), 0.0)
    book.register(register(wire, T0, instance="<urn:uuid:desk>"), 0.0)  # no push parameters
    start = wire.start(T0 + 1)
    assert isinstance(start, CallStarted)
    jobs = {j.device: j for j in book.call_started(start, 1.0)}
    assert set(jobs) == {"urn:uuid:iphone-1", "urn:uuid:android"}
    ios = jobs["urn:uuid:iphone-1"]
    assert (ios.provider, ios.token, ios.topic) == ("apns", TOKEN, "org.linphone.phone.voip")
    assert (jobs["urn:uuid:android"].provider, jobs["urn:uuid:android"].token) == ("fcm", "fcm-tok_1:x")
    # Expired (600 s), unregistered, or forgotten: no more pushes.
    assert book.call_started(start, 601.0) == []
    book.register(linphone_ios(wire, T0), 0.0)
    book.register(linphone_ios(wire, T0, expires=0), 1.0)
    assert book.call_started(start, 2.0) == []


@pytest.mark.parametrize(
    ("prid", "param"),
    [
        ("not-hex:voip", f"{TEAM}.org.linphone.phone.voip"),  # a token that would go into a URL
        (f"{TOKEN}:voip", "no-dot"),  # no topic
        (f"{TOKEN}:voip", f"{TEAM}.bad topic.voip"),
        (f"{TOKEN}:remote&{TOKEN}:remote", f"{TEAM}.org.x.remote&voip"),  # no VoIP token
    ],
)
def test_push_parameters_that_cannot_be_used_are_counted_not_kept(prid: str, param: str) -> None:
    wire, book = Wire(), PushBook()
    book.register(register(wire, T0, pn_provider="apns", pn_prid=prid, pn_param=param), 0.0)
    assert (book.device_count, book.refused) == (0, 1)


def test_refused_push_devices_are_counted_by_reason_and_account() -> None:
    wire, book = Wire(), PushBook()
    uuid = "6f1c1a4e-52d1-4c38-9f0e-1f0c0d9e1a2b"  # a UUID-shaped pn-prid: no APNs token
    book.register(register(wire, T0, pn_provider="apns", pn_prid=uuid, pn_param=f"{TEAM}.org.x.voip"), 0.0)
    book.register(register(wire, T0, pn_provider="apns", pn_prid=f"{'a' * 400}:voip", pn_param=f"{TEAM}.x.voip"), 0.0)
    book.register(register(wire, T0, aor="carol@example.com", pn_provider="webpush", pn_prid="x"), 0.0)
    book.register(register(wire, T0, aor="carol@example.com", pn_provider="apns", pn_prid=TOKEN, pn_param="x"), 0.0)
    assert book.take_refusals() == {
        (Refusal.TOKEN, "bob@example.com"): 2,
        (Refusal.PROVIDER, "carol@example.com"): 1,
        (Refusal.TOPIC, "carol@example.com"): 1,
    }
    assert book.take_refusals() == {} and book.device_count == 0


def test_refusals_name_a_bounded_number_of_accounts() -> None:
    wire, book = Wire(), PushBook()
    for n in range(200):
        book.register(register(wire, T0, aor=f"u{n}@example.com", pn_provider="apns", pn_prid="nope"), 0.0)
    refusals = book.take_refusals()
    assert len(refusals) == 65 and refusals[(Refusal.TOKEN, "*")] == 136
    assert sum(refusals.values()) == 200


async def test_refused_push_devices_are_exported_and_logged_with_the_account(
    caplog: pytest.LogCaptureFixture,
) -> None:
    service = Service(Config(nodes=(NodeAddress("kam1", "127.0.0.1", 9, "127.0.0.1", 5060),)))
    wire = Wire()
    for _ in range(3):
        raw = wire.raw(
            "register",
            T0,
            aor="bob@example.com",
            contact="sip:bob@192.0.2.1:5060",
            src_ip="192.0.2.1",
            src_port=5060,
            proto="udp",
            expires=600,
            user_agent="LinphoneiOS/5.2",
            pn_provider="apns",
            pn_prid="6f1c1a4e-52d1-4c38-9f0e-1f0c0d9e1a2b",
            pn_param=f"{TEAM}.x.voip",
        )
        service.on_frame("kam1", raw, 1.0)  # fmt: skip
    with caplog.at_level("WARNING", logger="evapi_worker"):
        service._count_refusals(2.0)
        service._count_refusals(2.5)  # a line a second at most
    exported = generate_latest(service.metrics.registry).decode()
    assert 'evapi_worker_push_devices_refused_total{reason="token"} 3.0' in exported
    (line,) = [r.getMessage() for r in caplog.records if "push device refused" in r.getMessage()]
    assert "reason=token" in line and "count=3" in line and "bob@example.com:3" in line and "pn-prid" in line


def test_a_410_forgets_a_token_only_if_it_was_not_registered_again_after_apple_said_so() -> None:
    wire, book = Wire(), PushBook()
    book.register(linphone_ios(wire, T0 + 10), 0.0)  # registered at T0 + 10
    device = "urn:uuid:iphone-1"
    # Apple: gone since T0 + 5, before that REGISTER (the app reinstalled, the same token): kept.
    assert not book.forget("bob@example.com", device, TOKEN, gone_since=T0 + 5)
    # A 410 for a token the device no longer uses: kept (it registered with a new one).
    assert not book.forget("bob@example.com", device, "b0" * 32, gone_since=T0 + 20)
    assert book.device_count == 1
    # Gone since after its last REGISTER: forgotten until it registers again.
    assert book.forget("bob@example.com", device, TOKEN, gone_since=T0 + 20)
    assert book.device_count == 0
    book.register(linphone_ios(wire, T0 + 30), 1.0)
    assert book.forget("bob@example.com", device, TOKEN)  # no timestamp: forgotten


@dataclass
class Stage:
    apns: ApnsStandIn
    fcm: FcmStandIn
    pusher: Pusher
    metrics: Metrics
    book: PushBook
    ended: set[str]
    claims: set[str]
    folder: Path


@asynccontextmanager
async def stage(tmp_path: Path, *, give_up_after: float = 10.0) -> AsyncIterator[Stage]:
    """Both stand-ins on loopback, and a Pusher whose production clients
    point at them."""
    async with trio.open_nursery() as nursery:
        standins = await start_standins(nursery, tmp_path)
        metrics, book, ended, claims = Metrics(), PushBook(), set[str](), set[str]()

        async def claim(node: str, key: str) -> bool:
            await trio.lowlevel.checkpoint()
            won = key not in claims
            claims.add(key)
            return won

        pusher = Pusher(
            push_clients(standins.settings), book, metrics, lambda call_id, aor: call_id not in ended, claim,
            give_up_after=give_up_after,
        )  # fmt: skip
        await nursery.start(pusher.run)
        yield Stage(standins.apns, standins.fcm, pusher, metrics, book, ended, claims, tmp_path)
        nursery.cancel_scope.cancel()


def job(
    call_id: str = "call-1@caller", provider: str = "apns", token: str = TOKEN, device: str = "dev-1",
    aor: str = "bob@example.com",
) -> PushJob:  # fmt: skip
    topic = "" if provider == "fcm" else "org.linphone.phone.voip"
    return PushJob(call_id, "kam1", aor, device, provider, token, topic,
                   "alice", 'Alice "A" Smith', "example.com", time.time(), trio.current_time())  # fmt: skip


async def settled(s: Stage, provider: str, result: str, count: int = 1) -> None:
    with trio.fail_after(10):
        while s.metrics.value("evapi_worker_pushes_total", {"provider": provider, "result": result}) < count:
            await trio.sleep(0.01)


async def test_an_apns_push_is_what_apple_and_linphone_expect(tmp_path: Path) -> None:
    async with stage(tmp_path) as s:
        s.pusher.submit([job()])
        await settled(s, "apns", "sent")
    (push,) = s.apns.received
    assert push.token == TOKEN and push.call_id == "call-1@caller"
    assert push.headers["apns-push-type"] == "voip" and push.headers["apns-topic"] == "org.linphone.phone.voip"
    assert push.headers["apns-priority"] == "10" and int(push.headers["apns-expiration"]) > time.time()
    token = push.headers["authorization"].removeprefix("bearer ")
    assert jwt.get_unverified_header(token)["kid"] == KEY_ID
    assert push.payload["aps"]["call-id"] == "call-1@caller" and push.payload["from-uri"] == "sip:alice@example.com"
    assert push.payload["display-name"] == 'Alice "A" Smith'
    assert s.metrics.value("evapi_worker_push_latency_seconds_count", {"provider": "apns"}) == 1


async def test_pushes_say_how_long_they_matter_and_collapse_per_account(tmp_path: Path) -> None:
    async with stage(tmp_path) as s:
        s.pusher.submit([job("c1@caller"), job("c2@caller"), job("c3@caller", aor="carol@example.com")])
        s.pusher.submit([job("c4@caller", provider="fcm", token="android-1")])
        await settled(s, "apns", "sent", 3)
        await settled(s, "fcm", "sent")
    bob1, bob2, carol = sorted(s.apns.received, key=lambda push: push.call_id)
    # Kept by Apple 30 s at most (push.expiration), the latest of an account's pushes wins.
    assert abs(int(bob1.headers["apns-expiration"]) - (time.time() + 30)) <= 2
    assert bob1.headers["apns-collapse-id"] == bob2.headers["apns-collapse-id"] != carol.headers["apns-collapse-id"]
    assert len(bob1.headers["apns-collapse-id"]) <= 64 and "bob" not in bob1.headers["apns-collapse-id"]
    # What an app needs to tell a stale push: the call's start, how long the push may be kept.
    assert bob1.payload["pn_ttl"] == 30
    assert time.mktime(time.strptime(bob1.payload["call-start"], "%Y-%m-%d %H:%M:%S")) - time.timezone <= time.time()
    (android,) = s.fcm.received
    assert android.payload["android"]["ttl"] == "30s"
    assert android.payload["android"]["collapse_key"] == bob1.headers["apns-collapse-id"]
    assert android.payload["data"]["call-start"] == bob1.payload["call-start"]


async def test_an_offline_phone_gets_the_push_when_back_unless_it_expired(tmp_path: Path) -> None:
    # The stand-in keeps a push for an offline phone as Apple does.
    async with stage(tmp_path) as s:
        delivered: list[str] = []
        s.apns.on_push = lambda push: delivered.append(push.call_id)
        s.apns.goes_offline(TOKEN)
        s.pusher.submit([job("c1@caller")])
        await settled(s, "apns", "sent", 1)
        s.pusher.submit([job("c2@caller")])
        await settled(s, "apns", "sent", 2)
        assert delivered == []
        assert [p.call_id for p in s.apns.comes_online(TOKEN)] == ["c2@caller"]  # one per app: the latest
        assert delivered == ["c2@caller"]
        s.apns.goes_offline(TOKEN)
        s.pusher.submit([job("c3@caller")])
        await settled(s, "apns", "sent", 3)
    # Back after its expiration (Apple's clock: the wall clock, 40 s on): never delivered.
    s.apns.clock = lambda: time.time() + 40
    assert s.apns.comes_online(TOKEN) == [] and [p.call_id for p in s.apns.expired] == ["c3@caller"]
    assert delivered == ["c2@caller"]


async def test_410_forgets_the_token_until_the_device_registers_again(tmp_path: Path) -> None:
    async with stage(tmp_path) as s:
        wire = Wire()
        s.book.register(linphone_ios(wire, T0), 0.0)
        s.apns.answer(TOKEN, 410, "Unregistered")
        start = wire.start(T0 + 1)
        assert isinstance(start, CallStarted)
        s.pusher.submit(s.book.call_started(start, 1.0))
        await settled(s, "apns", "unregistered")
        assert s.book.call_started(start, 2.0) == []  # forgotten
        s.book.register(linphone_ios(wire, T0 + 3), 3.0)
        assert len(s.book.call_started(start, 4.0)) == 1  # registered again


async def test_an_expired_provider_token_is_renewed_once(tmp_path: Path) -> None:
    async with stage(tmp_path) as s:
        s.apns.answer(TOKEN, 403, "ExpiredProviderToken")
        s.pusher.submit([job()])
        await settled(s, "apns", "sent")
        # Twice refused: renewed once, then given up (no loop).
        s.apns.answer(TOKEN, 403, "ExpiredProviderToken")
        s.apns.answer(TOKEN, 403, "ExpiredProviderToken")
        s.pusher.submit([job("call-2@caller")])
        await settled(s, "apns", "auth")
    assert [p.status for p in s.apns.received] == [403, 200, 403, 403]


async def test_throttled_pushes_are_retried_while_the_call_rings_never_after(tmp_path: Path) -> None:
    async with stage(tmp_path) as s:
        s.apns.answer(TOKEN, 429, "TooManyRequests")
        s.apns.answer(TOKEN, 503, "ServiceUnavailable")
        s.pusher.submit([job()])
        await settled(s, "apns", "sent")
        assert [p.status for p in s.apns.received] == [429, 503, 200]
        # Throttled, and the call ends during the wait: not sent again.
        for _ in range(3):
            s.apns.answer(TOKEN, 429, "TooManyRequests")
        s.pusher.submit([job("call-2@caller")])
        with trio.fail_after(5):
            while len(s.apns.received) < 4:
                await trio.sleep(0.01)
        s.ended.add("call-2@caller")
        await settled(s, "apns", "ended")
        await trio.sleep(0.5)
        assert len(s.apns.received) == 4
        assert s.metrics.value("evapi_worker_push_retries_total", {"provider": "apns"}) == 3


async def test_a_call_that_ended_first_sends_no_push_and_a_claimed_one_none_twice(tmp_path: Path) -> None:
    async with stage(tmp_path) as s:
        s.ended.add("gone@caller")
        s.pusher.submit([job("gone@caller")])
        await settled(s, "apns", "ended")
        # Two workers (one claims store): one push per device per call.
        s.pusher.submit([job("twice@caller"), job("twice@caller")])
        await settled(s, "apns", "taken")
        await settled(s, "apns", "sent")
    assert [p.call_id for p in s.apns.received] == ["twice@caller"]


async def test_fcm_messages_with_oauth_tokens_renewed_when_refused(tmp_path: Path) -> None:
    async with stage(tmp_path) as s:
        s.pusher.submit([job(provider="fcm", token="android-token-1")])
        await settled(s, "fcm", "sent")
        (msg,) = s.fcm.received
        assert msg.payload["android"]["priority"] == "high" and msg.payload["data"]["call-id"] == "call-1@caller"
        # The access token is kept: the second message asks for none.
        s.pusher.submit([job("call-2@caller", provider="fcm", token="android-token-1")])
        await settled(s, "fcm", "sent", 2)
        assert s.fcm.tokens_issued == 1
        # Revoked: 401, a new access token, sent.
        s.fcm.revoke_tokens()
        s.pusher.submit([job("call-3@caller", provider="fcm", token="android-token-1")])
        await settled(s, "fcm", "sent", 3)
        assert s.fcm.tokens_issued == 2
        # An app removed: 404 UNREGISTERED, the token forgotten.
        s.fcm.answer("android-token-2", 404, "UNREGISTERED")
        s.pusher.submit([job("call-4@caller", provider="fcm", token="android-token-2", device="dev-2")])
        await settled(s, "fcm", "unregistered")


def test_key_files_that_cannot_serve_are_a_one_line_start_up_error(tmp_path: Path) -> None:
    key = tmp_path / "AuthKey.p8"
    make_apns_key(key)

    def apns(**kw: Any) -> PushSettings:
        return PushSettings(apns=ApnsSettings(**{"key_file": key, "key_id": KEY_ID, "team_id": TEAM, **kw}))

    assert set(push_clients(apns())) == {"apns", "apns.dev"}
    with pytest.raises(ConfigError, match=r"push\.apns\.key_id"):
        push_clients(apns(key_id="short"))
    with pytest.raises(ConfigError, match=r"push\.apns\.key_file: .* cannot be read"):
        push_clients(apns(key_file=tmp_path / "missing.p8"))
    key.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by every user"):
        push_clients(apns())
    other = tmp_path / "other.p8"
    other.write_text("not a key")
    other.chmod(0o600)
    with pytest.raises(ConfigError, match="not an APNs token key"):
        push_clients(apns(key_file=other))


def test_push_devices_are_kept_across_restarts_with_the_state(tmp_path: Path) -> None:
    wire, engine, book = Wire(), Engine(), PushBook()
    store = StateStore(tmp_path / "state", 1000.0, lambda file, exc: None)
    book.register(linphone_ios(wire, T0), 0.0)  # registered for 600 s
    assert store.write(store.snapshot(engine, 10.0, book=book))
    restored = PushBook()
    # Restarted 100 s later (wall clock), on a clock that starts at 0.
    StateStore(tmp_path / "state", 1110.0, lambda file, exc: None).restore(Engine(), 0.0, lambda *a: [], restored)
    start = wire.start(T0 + 1)
    assert isinstance(start, CallStarted)
    assert [j.token for j in restored.call_started(start, 480.0)] == [TOKEN]  # 600 - 110 s left
    assert restored.call_started(start, 495.0) == []


# -- one account's devices and pushes cost only that account -----------------


def test_an_accounts_flood_of_devices_evicts_its_own_oldest_never_anothers() -> None:
    wire, book = Wire(), PushBook(max_devices=100, max_per_account=3)
    book.register(linphone_ios(wire, T0, aor="bob@example.com"), 0.0)
    for n in range(10):
        token = f"{n:064x}"
        book.register(linphone_ios(wire, T0, token, aor="mallory@example.com", instance=f"<urn:uuid:m{n}>"), 0.0)
    assert book.device_count == 4
    assert book.take_evictions() == {"mallory@example.com": 7}
    start = wire.start(T0 + 1)
    assert isinstance(start, CallStarted)
    assert [j.device for j in book.call_started(start, 1.0)] == ["urn:uuid:iphone-1"]
    # Mallory's three newest are the ones kept.
    mallory = wire.start(T0 + 1, aor="mallory@example.com")
    assert isinstance(mallory, CallStarted)
    assert [j.device for j in book.call_started(mallory, 1.0)] == [f"urn:uuid:m{n}" for n in (7, 8, 9)]


def test_a_full_book_keeps_what_it_has_and_refuses_the_new_device() -> None:
    wire, book = Wire(), PushBook(max_devices=2, max_per_account=10)
    book.register(linphone_ios(wire, T0, aor="bob@example.com"), 0.0)
    book.register(linphone_ios(wire, T0 + 300, "b2" * 32, aor="carol@example.com"), 300.0)
    book.register(linphone_ios(wire, T0 + 300, "b3" * 32, aor="mallory@example.com"), 300.0)
    assert book.device_count == 2 and book.take_evictions() == {"mallory@example.com": 1}
    # An expired registration (bob's, 600 s) frees its place for the next one.
    book.register(linphone_ios(wire, T0 + 601, "b3" * 32, aor="mallory@example.com"), 601.0)
    assert book.device_count == 2 and book.take_evictions() == {}


def test_unregistrations_free_the_book_by_contact_token_or_all_at_once() -> None:
    wire, book = Wire(), PushBook()
    book.register(linphone_ios(wire, T0), 0.0)
    book.register(linphone_ios(wire, T0, "c1" * 32, instance="<urn:uuid:ipad>", contact="sip:ipad@192.0.2.5:5060"), 0.0)
    book.register(linphone_ios(wire, T0, "c2" * 32, instance="<urn:uuid:mac>", contact="sip:mac@192.0.2.6:5060"), 0.0)
    assert book.device_count == 3
    # Kamailio describes an unregistered contact from the request: no +sip.instance, the token in the URI.
    book.register(
        linphone_ios(wire, T0 + 1, "c1" * 32, instance=None, contact="sip:other@192.0.2.5:5060", expires=0), 1.0
    )
    assert book.device_count == 2
    book.register(register(wire, T0 + 2, instance=None, contact="*", expires=0), 2.0)  # Contact: *
    assert book.device_count == 0


@dataclass(eq=False)
class HeldClient:
    """A provider that answers a push only when the test says so."""

    answer: trio.Event
    sent: list[PushJob]

    async def send(self, job: PushJob) -> PushAnswer:
        self.sent.append(job)
        if job.aor != "bob@example.com":
            await self.answer.wait()
        return PushAnswer(PushResult.SENT, 200, "")

    def renew_token(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


async def test_one_accounts_storm_of_pushes_makes_anothers_wait_one_turn_at_most() -> None:
    client = HeldClient(trio.Event(), [])
    metrics = Metrics()

    async def claim(node: str, key: str) -> bool:
        return True

    pusher = Pusher({"apns": client}, PushBook(), metrics, lambda call_id, aor: True, claim, limit=100, per_account=8,
                    queued_per_account=50)  # fmt: skip
    async with trio.open_nursery() as nursery:
        await nursery.start(pusher.run)
        pusher.submit([job(f"storm-{n}", device=f"m{n}", aor="mallory@example.com") for n in range(200)])
        await trio.testing.wait_all_tasks_blocked()
        # Its last fifty queued (the oldest dropped, counted), eight of them at once.
        assert len(client.sent) == 8 and pusher.waiting == 42
        assert metrics.value("evapi_worker_pushes_total", {"provider": "apns", "result": "dropped"}) == 150
        bob = PushJob("bobs@caller", "kam1", "bob@example.com", "bob-iphone", "apns", TOKEN, "org.x.voip",
                      "alice", None, None, time.time(), trio.current_time())  # fmt: skip
        pusher.submit([bob])
        await trio.testing.wait_all_tasks_blocked()
        assert client.sent[-1] is bob
        assert metrics.value("evapi_worker_pushes_total", {"provider": "apns", "result": "sent"}) == 1
        client.answer.set()
        await trio.testing.wait_all_tasks_blocked()
        assert metrics.value("evapi_worker_pushes_total", {"provider": "apns", "result": "sent"}) == 51
        nursery.cancel_scope.cancel()


def test_a_register_whose_event_comes_after_its_unregistration_brings_no_device_back() -> None:
    # Kamailio's processes emit in any order: a REGISTER answered just
    # before Contact: * may have its event read after the unregistration's.
    wire, book = Wire(), PushBook()
    book.register(register(wire, T0 + 2, instance=None, contact="*", expires=0), 2.0)
    book.register(linphone_ios(wire, T0 + 1), 2.1)
    assert book.device_count == 0
    book.register(linphone_ios(wire, T0 + 3), 3.0)  # registered again, after it
    assert book.device_count == 1
    book.register(linphone_ios(wire, T0 + 5, instance=None, expires=0), 5.0)  # its token unregistered
    book.register(linphone_ios(wire, T0 + 4), 5.1)
    assert book.device_count == 0


async def test_one_account_pushes_at_its_rate_and_another_goes_between(autojump_clock: trio.testing.MockClock) -> None:
    sent: list[tuple[str, float]] = []

    class Instant:
        async def send(self, job: PushJob) -> PushAnswer:
            await trio.sleep(0.001)
            sent.append((job.aor, trio.current_time()))
            return PushAnswer(PushResult.SENT, 200, "")

        def renew_token(self) -> None:
            pass

        async def aclose(self) -> None:
            pass

    async def claim(node: str, key: str) -> bool:
        return True

    pusher = Pusher({"apns": Instant()}, PushBook(), Metrics(), lambda call_id, aor: True, claim, rate_per_account=10)
    async with trio.open_nursery() as nursery:
        await nursery.start(pusher.run)
        start = trio.current_time()
        pusher.submit([job(f"storm-{n}", device=f"m{n}", aor="mallory@example.com") for n in range(100)])
        await trio.sleep(1.0)
        asked = trio.current_time()
        pusher.submit([job("bobs", device="bob-iphone")])
        await trio.sleep(0.01)
        # His turn came at once, however many of mallory's wait.
        assert [round(at - asked, 3) for aor, at in sent if aor == "bob@example.com"] == [0.001]
        await trio.sleep(4.0)
        nursery.cancel_scope.cancel()
    storm = [at - start for aor, at in sent if aor == "mallory@example.com"]
    # Ten at once (the bucket), then ten a second, for five seconds.
    assert len([t for t in storm if t < 0.05]) == 10
    assert 58 <= len(storm) <= 61, len(storm)
