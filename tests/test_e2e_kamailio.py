"""End to end: real Kamailio (the bundled config), the worker, real SIPp phones."""

from __future__ import annotations

import shutil
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from evapi_worker.config import Config
from evapi_worker.demo import DESK_UA, IPHONE_UA, KamailioProcess, Phones, Watch, received
from evapi_worker.evapi_client import Backoff, NodeAddress
from evapi_worker.service import Service

from .sipp_device import free_port

pytestmark = pytest.mark.skipif(
    shutil.which("kamailio") is None or shutil.which("sipp") is None,
    reason="needs kamailio and sipp (apt-get install kamailio kamailio-extra-modules sip-tester)",
)

HOST = "127.0.0.1"


@dataclass
class Platform:
    service: Service
    phones: Phones
    watch: Watch
    folder: Path

    def metric(self, name: str, **labels: str) -> float:
        return self.service.metrics.value(name, labels)


@asynccontextmanager
async def platform(tmp_path: Path) -> AsyncIterator[Platform]:
    sip_port = free_port()
    evapi_port = free_port(socket.SOCK_STREAM)
    kam = KamailioProcess(HOST, sip_port, HOST, evapi_port, "e2e", HOST, tmp_path)
    node = NodeAddress("e2e", HOST, evapi_port, HOST, sip_port)
    async with kam.running(), trio.open_nursery() as nursery:
        service = Service(Config(nodes=(node,), backoff=Backoff(0.01, 0.1)))
        watch = Watch()
        service.decision_listeners.append(watch.on_decision)
        service.actions.outcome_listeners.append(watch.on_outcome)
        await nursery.start(service.run)
        with trio.fail_after(10):
            while not service.connections["e2e"].connected:
                await trio.sleep(0.02)
        yield Platform(service, Phones(HOST, sip_port, tmp_path), watch, tmp_path)
        nursery.cancel_scope.cancel()


async def test_answered_elsewhere_late_iphone_gets_invite_and_cancel_with_reason(tmp_path: Path) -> None:
    async with platform(tmp_path) as p:
        call_id = "e2e-answered-1@127.0.0.1"
        iphone = tmp_path / "iphone.log"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(p.phones.phone, "bob", DESK_UA, "desk", "phone_answers", 5000, tmp_path / "desk.log")
            await trio.sleep(0.5)
            await p.phones.call("alice", "Alice Liddell", "bob", call_id)
            nursery.start_soon(p.phones.phone, "bob", IPHONE_UA, "iphone", "phone_rings", 2000, iphone)
            outcome = await p.watch.outcome(call_id, timeout=10)
        assert outcome is not None and outcome.value == "completed"
        assert received(iphone) == (call_id, 'SIP;cause=200;text="Call completed elsewhere"')
        assert [(d.action.value, d.reason) for d in p.watch.decisions] == [("fake_call", "answered")]
        assert p.metric("evapi_worker_late_registrations_total", ended="answered") == 1


async def test_missed_call_late_iphone_gets_cancel_without_reason(tmp_path: Path) -> None:
    async with platform(tmp_path) as p:
        call_id = "e2e-missed-1@127.0.0.1"
        iphone = tmp_path / "iphone.log"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(p.phones.phone, "carol", DESK_UA, "desk", "phone_rings", 5000, tmp_path / "desk.log")
            await trio.sleep(0.5)
            await p.phones.call("alice", "Alice", "carol", call_id)  # gives up after 2.5 s of ringing
            nursery.start_soon(p.phones.phone, "carol", IPHONE_UA, "iphone", "phone_rings", 2000, iphone)
            outcome = await p.watch.outcome(call_id, timeout=10)
        assert outcome is not None and outcome.value == "completed"
        assert received(iphone) == (call_id, None)
        assert [(d.action.value, d.reason) for d in p.watch.decisions] == [("fake_call", "missed")]


async def test_iphone_registering_while_it_rings_gets_the_real_call_from_tsilo(tmp_path: Path) -> None:
    async with platform(tmp_path) as p:
        call_id = "e2e-ringing-1@127.0.0.1"
        iphone = tmp_path / "iphone.log"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(p.phones.phone, "dave", DESK_UA, "desk", "phone_rings", 6000, tmp_path / "desk.log")
            await trio.sleep(0.5)
            nursery.start_soon(p.phones.call, "alice", "Alice", "dave", call_id)
            await trio.sleep(1.0)  # the call rings on the desk phone now
            nursery.start_soon(p.phones.phone, "dave", IPHONE_UA, "iphone", "phone_rings", 4000, iphone)
        # tsilo added the iPhone as a branch: it got the real INVITE, then the
        # real CANCEL when alice gave up; the worker did nothing.
        assert received(iphone) == (call_id, None)
        assert [(d.action.value, d.reason) for d in p.watch.decisions] == [("none", "ringing")]
        assert p.metric("evapi_worker_fake_calls_total", outcome="completed") == 0
