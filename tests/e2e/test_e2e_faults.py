"""Faults with real Kamailio: restarts, a node not up yet, one node of two down."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import trio

from evapi_worker.config import Config, EvapiSettings
from evapi_worker.core.links import NodeAddress
from evapi_worker.core.outcomes import Outcome
from evapi_worker.lab.demo import Watch
from evapi_worker.lab.kamailio_process import KamailioProcess
from evapi_worker.lab.phones import Phones
from evapi_worker.service import Service

from ..e2e_platform import HOST, Platform, late_iphone, needs_platform
from ..sipp_device import free_port, free_sip_port

pytestmark = needs_platform


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
    service = Service(Config(nodes=(node,), evapi=EvapiSettings(reconnect_initial=0.05, reconnect_max=0.2)))
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
            p = Platform(service, Phones(HOST, sip_port, tmp_path), watch, tmp_path, second)
            outcome, _ = await late_iphone(p, "bob", "phone_answers", "restart-1@127.0.0.1")
            assert outcome is Outcome.COMPLETED
        nursery.cancel_scope.cancel()


async def test_one_node_of_two_down_the_other_still_serves(tmp_path: Path) -> None:
    sip_port, evapi_port = free_sip_port(), free_port(socket.SOCK_STREAM)
    up = NodeAddress("up", HOST, evapi_port, HOST, sip_port)
    down = NodeAddress("down", HOST, free_port(socket.SOCK_STREAM), HOST, free_port())
    service = Service(Config(nodes=(up, down), evapi=EvapiSettings(reconnect_initial=0.05, reconnect_max=0.2)))
    watch = watched(service)
    kam = KamailioProcess(HOST, sip_port, HOST, evapi_port, "up", HOST, tmp_path)
    async with kam.running(), trio.open_nursery() as nursery:
        await nursery.start(service.run)
        # Up once it answered a ping; the other never connects.
        await until(lambda: service.liveness.healthy() == (False, ["down"]))
        p = Platform(service, Phones(HOST, sip_port, tmp_path), watch, tmp_path, kam)
        outcome, _ = await late_iphone(p, "bob", "phone_answers", "twonodes-1@127.0.0.1")
        assert outcome is Outcome.COMPLETED
        assert service.metrics.value("evapi_worker_kamailio_up", {"node": "down"}) == 0
        nursery.cancel_scope.cancel()


async def test_a_frozen_kamailio_is_seen_down_and_up_again_when_it_thaws(tmp_path: Path) -> None:
    # SIGSTOP: the TCP connection stays open (the kernel keeps it), events
    # just stop. Only an unanswered ping tells: the worker drops the
    # connection, reports the node down, and keeps trying.
    sip_port, evapi_port = free_sip_port(), free_port(socket.SOCK_STREAM)
    node = NodeAddress("k", HOST, evapi_port, HOST, sip_port)
    config = Config(
        nodes=(node,),
        evapi=EvapiSettings(reconnect_initial=0.05, reconnect_max=0.2, ack_timeout=0.3, ping_interval=0.3),
        metrics=(HOST, free_port(socket.SOCK_STREAM)),
    )
    service = Service(config)
    kam = KamailioProcess(HOST, sip_port, HOST, evapi_port, "k", HOST, tmp_path)
    async with kam.running(), trio.open_nursery() as nursery:
        await nursery.start(service.run)
        up = {"node": "k"}
        await until(lambda: service.metrics.value("evapi_worker_kamailio_up", up) == 1)
        assert await health(service) == 200
        assert kam.process is not None
        os.killpg(kam.process.pid, signal.SIGSTOP)
        try:
            await until(lambda: service.metrics.value("evapi_worker_kamailio_up", up) == 0, timeout=5)
            assert service.liveness.healthy() == (False, ["k"])
            assert await health(service) == 503
            await trio.sleep(1.0)  # reconnects reach the frozen node's backlog, pings still fail
            assert service.metrics.value("evapi_worker_kamailio_up", up) == 0
        finally:
            os.killpg(kam.process.pid, signal.SIGCONT)
        await until(lambda: service.metrics.value("evapi_worker_kamailio_up", up) == 1, timeout=10)
        assert service.liveness.healthy() == (True, [])
        assert service.metrics.value("evapi_worker_reconnects_total", up) >= 1
        nursery.cancel_scope.cancel()


async def health(service: Service) -> int:
    """The status code of the worker's /healthz."""
    assert service.metrics_port is not None
    stream = await trio.open_tcp_stream(HOST, service.metrics_port)
    async with stream:
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(4096):
                data += chunk
    return int(data.split(b" ", 2)[1])
