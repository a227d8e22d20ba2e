"""Faults with real Kamailio: restarts, a node not up yet, one node of two down."""

from __future__ import annotations

import socket
from pathlib import Path

import trio

from evapi_worker.config import Config
from evapi_worker.demo import KamailioProcess, Phones, Watch
from evapi_worker.evapi_client import Backoff, NodeAddress
from evapi_worker.service import Service
from evapi_worker.sipp_runner import Outcome

from .sipp_device import free_port, free_sip_port
from .test_e2e_kamailio import HOST, Platform, late_iphone, pytestmark  # noqa: F401 (same skip rule)


def watched(service: Service) -> Watch:
    watch = Watch()
    service.decision_listeners.append(watch.on_decision)
    service.actions.outcome_listeners.append(watch.on_outcome)
    return watch


async def until(predicate: object, timeout: float = 10) -> None:
    assert callable(predicate)
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


async def test_kamailio_restart_reconnects_and_later_calls_are_handled(tmp_path: Path) -> None:
    sip_port, evapi_port = free_sip_port(), free_port(socket.SOCK_STREAM)
    node = NodeAddress("k", HOST, evapi_port, HOST, sip_port)
    service = Service(Config(nodes=(node,), backoff=Backoff(0.05, 0.2)))
    watch = watched(service)
    conn = service.connections["k"]
    async with trio.open_nursery() as nursery:
        # Kamailio not up yet when the worker starts: it keeps retrying.
        await nursery.start(service.run)
        await trio.sleep(0.5)
        assert not conn.connected
        first = KamailioProcess(HOST, sip_port, HOST, evapi_port, "k", HOST, tmp_path / "a")
        (tmp_path / "a").mkdir()
        async with first.running():
            await until(lambda: conn.connected)
        # Kamailio stopped: the worker notices and waits for it.
        await until(lambda: not conn.connected)
        assert service.metrics.value("evapi_worker_kamailio_up", {"node": "k"}) == 0
        second = KamailioProcess(HOST, sip_port, HOST, evapi_port, "k", HOST, tmp_path / "b")
        (tmp_path / "b").mkdir()
        async with second.running():
            await until(lambda: conn.connected)
            assert service.metrics.value("evapi_worker_reconnects_total", {"node": "k"}) >= 1
            p = Platform(service, Phones(HOST, sip_port, tmp_path), watch, tmp_path)
            outcome, _ = await late_iphone(p, "bob", "phone_answers", "restart-1@127.0.0.1")
            assert outcome is Outcome.COMPLETED
        nursery.cancel_scope.cancel()


async def test_one_node_of_two_down_the_other_still_serves(tmp_path: Path) -> None:
    sip_port, evapi_port = free_sip_port(), free_port(socket.SOCK_STREAM)
    up = NodeAddress("up", HOST, evapi_port, HOST, sip_port)
    down = NodeAddress("down", HOST, free_port(socket.SOCK_STREAM), HOST, free_port())
    service = Service(Config(nodes=(up, down), backoff=Backoff(0.05, 0.2)))
    watch = watched(service)
    kam = KamailioProcess(HOST, sip_port, HOST, evapi_port, "up", HOST, tmp_path)
    async with kam.running(), trio.open_nursery() as nursery:
        await nursery.start(service.run)
        await until(lambda: service.connections["up"].connected)
        assert service.healthy() == (False, ["down"])
        p = Platform(service, Phones(HOST, sip_port, tmp_path), watch, tmp_path)
        outcome, _ = await late_iphone(p, "bob", "phone_answers", "twonodes-1@127.0.0.1")
        assert outcome is Outcome.COMPLETED
        assert service.metrics.value("evapi_worker_kamailio_up", {"node": "down"}) == 0
        nursery.cancel_scope.cancel()
