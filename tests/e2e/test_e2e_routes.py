"""Nobody but the worker drives the routes: the fake-call route, the pin and
message commands and the evapi socket itself, tried against real Kamailio
with the requests a stranger could send."""

from __future__ import annotations

import secrets
import socket
from functools import partial
from pathlib import Path

import pytest
import trio

from evapi_worker.core.commands import Message, Pin
from evapi_worker.core.links import CommandFailed
from evapi_worker.lab.phones import IPHONE_UA
from evapi_worker.service import Service

from ..e2e_platform import DOMAIN, HOST, Platform, needs_platform, platform
from ..sipp_device import free_port

pytestmark = needs_platform

STRANGER = "127.0.0.2"  # on this machine, but not the worker's address


async def sip_request(target: tuple[str, int], message: str, source: str = HOST) -> int:
    """Send one request over UDP from ``source``; the code of the first
    response that is not 100 Trying (a ringing device's 180, or a final)."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        await sock.bind((source, 0))
        port = sock.getsockname()[1]
        await sock.sendto(message.replace("PORT", str(port)).replace("SOURCE", source).encode(), target)
        with trio.fail_after(5):
            while True:
                data = await sock.recv(65536)
                code = int(data.split(b" ", 2)[1])
                if code != 100:
                    return code


def invite(call_id: str, pin: str | None) -> str:
    """A fake-call INVITE as the worker's SIPp sends it."""
    lines = [
        f"INVITE sip:bob@{DOMAIN} SIP/2.0",
        f"Via: SIP/2.0/UDP SOURCE:PORT;branch=z9hG4bK-{secrets.token_hex(6)}",
        f"From: <sip:alice@caller.example.net>;tag=evw-{secrets.token_hex(3)}",
        f"To: <sip:bob@{DOMAIN}>",
        f"Call-ID: {call_id}",
        "CSeq: 1 INVITE",
        "Contact: <sip:alice@SOURCE:PORT>",
        "Max-Forwards: 70",
    ]
    if pin is not None:
        lines.append(f"X-Evapi-Pin: {pin}")
    return "\r\n".join([*lines, "Content-Length: 0", "", ""])


def target(p: Platform) -> tuple[str, int]:
    assert p.kamailio is not None
    return (HOST, p.kamailio.sip_port)


async def iphone(p: Platform, nursery: trio.Nursery, user: str) -> tuple[str, str]:
    """An iPhone that registers and stays; its Contact and where it is."""
    port = free_port()
    log = p.folder / f"{user}.log"
    nursery.start_soon(partial(p.phones.phone, user, IPHONE_UA, "iphone", "phone_rings", 8000, log, port=port))
    with trio.fail_after(5):
        while not p.metric("evapi_worker_events_total", node="e2e", type="register"):
            await trio.sleep(0.05)
    return f"sip:dev-iphone@{HOST}:{port};transport=UDP", f"sip:{HOST}:{port};transport=udp"


async def pin(service: Service, aor: str, ruri: str, dst: str, ttl: int = 30) -> str:
    key = secrets.token_urlsafe(12)
    await service.send_command("e2e", Pin(key=key, ruri=ruri, dst=dst, ttl=ttl, aor=aor))
    return key


async def test_a_pin_from_another_address_is_refused(tmp_path: Path) -> None:
    async with platform(tmp_path) as p:
        assert await sip_request(target(p), invite("rogue-1@x", "AAAAAAAAAAAA"), source=STRANGER) == 403


async def test_unknown_reused_and_expired_pin_keys_find_nothing(tmp_path: Path) -> None:
    async with platform(tmp_path) as p, trio.open_nursery() as nursery:
        contact, dst = await iphone(p, nursery, "bob")
        assert await sip_request(target(p), invite("rogue-2@x", "NoSuchKey123")) == 404
        key = await pin(p.service, f"bob@{DOMAIN}", contact, dst)
        assert await sip_request(target(p), invite("pinned-1@x", key)) == 180  # the phone rings
        assert await sip_request(target(p), invite("pinned-2@x", key)) == 404  # a key serves once
        short = await pin(p.service, f"bob@{DOMAIN}", contact, dst, ttl=1)
        await trio.sleep(2.5)
        assert await sip_request(target(p), invite("pinned-3@x", short)) == 404  # expired
        nursery.cancel_scope.cancel()


async def test_a_pin_must_name_a_registered_contact_of_the_account(tmp_path: Path) -> None:
    async with platform(tmp_path) as p:
        with pytest.raises(CommandFailed, match="not a registered contact") as refused:
            await pin(p.service, f"bob@{DOMAIN}", "sip:victim@127.0.0.9:5999", "sip:127.0.0.9:5999;transport=udp")
        assert refused.value.reason == "refused"


async def test_a_message_must_go_to_a_registered_contact(tmp_path: Path) -> None:
    async with platform(tmp_path) as p:
        message = Message(
            ruri="sip:victim@127.0.0.9:5999",
            dst="sip:127.0.0.9:5999;transport=udp",
            from_uri="sip:alice@caller.example.net",
            to_uri=f"sip:bob@{DOMAIN}",
            body="call-ended;call-id=c@x;reason=missed",
        )
        with pytest.raises(CommandFailed, match="not a registered contact") as refused:
            await p.service.send_command("e2e", message)
        assert refused.value.reason == "refused"


async def test_a_rogue_invite_with_a_live_calls_call_id_cannot_silence_its_cancel(tmp_path: Path) -> None:
    async with platform(tmp_path) as p, trio.open_nursery() as nursery:
        call_id = "live-call@caller.example.net"
        nursery.start_soon(p.phones.call, "alice", "Alice", "carol", call_id)  # held, given up after 2.5 s
        with trio.fail_after(5):
            while not p.metric("evapi_worker_events_total", node="e2e", type="call_start"):
                await trio.sleep(0.05)
        # From the worker's own address, with that Call-ID and a made-up pin.
        assert await sip_request(target(p), invite(call_id, "MadeUpPin123")) == 404
        with trio.fail_after(8):
            while not p.metric("evapi_worker_events_total", node="e2e", type="call_cancelled"):
                await trio.sleep(0.05)


async def test_evapi_clients_outside_the_allow_list_are_closed_at_once(tmp_path: Path) -> None:
    async with platform(tmp_path) as p:
        assert p.kamailio is not None
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with sock:
            await sock.bind((STRANGER, 0))
            await sock.connect((HOST, p.kamailio.evapi_port))
            # A REGISTER happens meanwhile: the stranger must hear nothing of it.
            await p.phones.phone("dave", IPHONE_UA, "iphone", "phone_rings", 200, tmp_path / "d.log")
            with trio.fail_after(5):
                assert await sock.recv(65536) == b""  # closed by Kamailio, nothing sent
        assert p.service.liveness.healthy() == (True, [])  # the worker itself stays connected


async def test_a_retry_takes_over_only_a_pin_whose_invite_never_came(tmp_path: Path) -> None:
    # A worker pinned two fake calls and died; restarted, it retries both.
    # The one whose INVITE never came is handed over (its old pin refused
    # from then on); the one that went out stays taken: none lost, none twice.
    async with platform(tmp_path) as p, trio.open_nursery() as nursery:
        contact, dst = await iphone(p, nursery, "bob")

        async def pin_claimed(claim: str, retry: bool = False) -> tuple[str, str | None]:
            key = secrets.token_urlsafe(12)
            pin = Pin(
                key=key, ruri=contact, dst=dst, ttl=30, claim=claim, claim_ttl=30, aor=f"bob@{DOMAIN}", retry=int(retry)
            )
            return key, (await p.service.send_command("e2e", pin)).claim

        unused, sent = "a1" * 16, "b2" * 16
        old_unused, claimed = await pin_claimed(unused)
        assert claimed == "won"
        old_sent, claimed = await pin_claimed(sent)
        assert claimed == "won"
        assert await sip_request(target(p), invite("went-out@x", old_sent)) == 180
        # Another worker, not retrying, is told taken for both.
        assert (await pin_claimed(unused))[1] == "taken"
        # The retries.
        new_key, claimed = await pin_claimed(unused, retry=True)
        assert claimed == "won"
        assert (await pin_claimed(sent, retry=True))[1] == "taken"
        assert await sip_request(target(p), invite("late-invite@x", old_unused)) == 404  # the old pin is gone
        assert await sip_request(target(p), invite("retried@x", new_key)) == 180
        assert (await pin_claimed(unused, retry=True))[1] == "taken"  # used now: stays taken
        nursery.cancel_scope.cancel()
