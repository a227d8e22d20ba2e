"""The whole worker against in-test evapi servers and a real SIPp device."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

from evapi_worker.config import Config, EvapiSettings
from evapi_worker.core.engine import Decision, EngineSettings
from evapi_worker.core.links import NodeAddress
from evapi_worker.core.netstring import encode
from evapi_worker.service import Service
from evapi_worker.sipp_runner import SippSettings

from ..evapi_server import EvapiServer
from ..sipp_device import device, free_port, needs_sipp

T0 = 1_700_000_000.0
STAMPED_FROM_NOW = True  # T0 is set as each test starts (conftest.py)
IPHONE = "LinphoneiOS/5.2.5 (iPhone) LinphoneSDK/5.3.0"


@dataclass
class World:
    service: Service
    servers: dict[str, EvapiServer]
    decisions: list[Decision]

    def metric(self, name: str, **labels: str) -> float:
        return self.service.metrics.value(name, labels)

    async def wait_metric(self, name: str, value: float, timeout: float = 15.0, **labels: str) -> None:
        with trio.fail_after(timeout):
            while self.metric(name, **labels) < value:
                await trio.sleep(0.01)


@asynccontextmanager
async def world(
    sip_ports: dict[str, int] | None = None, evapi: EvapiSettings | None = None, **engine: Any
) -> AsyncIterator[World]:
    sip_ports = sip_ports or {}
    async with trio.open_nursery() as nursery:
        servers = {name: EvapiServer(name) for name in ("kam1", "kam2")}
        for server in servers.values():
            await server.start(nursery)
        nodes = tuple(
            NodeAddress(name, "127.0.0.1", s.port, "127.0.0.1", sip_ports.get(name, free_port()))
            for name, s in servers.items()
        )
        config = Config(
            nodes=nodes,
            engine=EngineSettings(**engine),
            sipp=SippSettings(max_concurrent=2, timeout=20),
            evapi=msgspec.structs.replace(evapi or EvapiSettings(), reconnect_initial=0.01, reconnect_max=0.05),
        )
        service = Service(config)
        decisions: list[Decision] = []
        service.decision_listeners.append(decisions.append)
        await nursery.start(service.run)
        for server in servers.values():
            await server.wait_for(lambda s=server: bool(s.streams))
        yield World(service, servers, decisions)
        nursery.cancel_scope.cancel()


def register(server: EvapiServer, ts: float, **kw: Any) -> bytes:
    fields = {
        "aor": "bob@example.com",
        "contact": "sip:bob@127.0.0.1:5099;transport=udp",
        "src_ip": "127.0.0.1",
        "src_port": 5099,
        "proto": "udp",
        "expires": 600,
        "user_agent": IPHONE,
        "instance": "<urn:uuid:0001>",
        **kw,
    }
    return server.event("register", ts, **fields)


def start(server: EvapiServer, ts: float, call_id: str = "orig-call-1@10.0.0.5", **kw: Any) -> bytes:
    fields = {"call_id": call_id, "aor": "bob@example.com", "from_user": "alice", "from_name": "Alice", **kw}
    return server.event("call_start", ts, **fields)


@needs_sipp
async def test_late_iphone_on_another_node_gets_the_call_through_that_node(tmp_path: Path) -> None:
    async with device("phone_rings", tmp_path) as dev, world({"kam2": dev.port}) as w:
        kam1, kam2 = w.servers["kam1"], w.servers["kam2"]
        await kam1.send(start(kam1, T0) + kam1.event("call_answered", T0 + 3, call_id="orig-call-1@10.0.0.5"))
        await w.wait_metric("evapi_worker_events_total", 1, node="kam1", type="call_answered")
        await kam2.send(register(kam2, T0 + 5))
        await w.wait_metric("evapi_worker_fake_calls_total", 1, outcome="completed")
        await dev.finished()
        # The pin went to the node the device registered on, and only there.
        assert kam1.actions == []
        (pin,) = [c for c in kam2.commands if c["cmd"] == "pin"]
        assert pin["ruri"] == "sip:bob@127.0.0.1:5099;transport=udp"
        assert pin["dst"] == "sip:127.0.0.1:5099;transport=udp"
        assert pin["ttl"] == 30 and len(pin["key"]) >= 16
        lines = dev.lines()
        assert lines[0].startswith('invite call_id= orig-call-1@10.0.0.5 from= "Alice" <sip:alice@example.com>')
        assert lines[1] == 'cancel call_id= orig-call-1@10.0.0.5 reason= SIP;cause=200;text="Call completed elsewhere"'
        assert [(d.action.value, d.reason, d.node) for d in w.decisions] == [("fake_call", "answered", "kam2")]
        assert w.metric("evapi_worker_late_registrations_total", ended="answered") == 1
        assert w.metric("evapi_worker_commands_acked_total", node="kam2", command="pin") == 1
        assert w.metric("evapi_worker_sipp_duration_seconds_count") == 1
        assert w.metric("evapi_worker_decision_latency_seconds_count") == 1
        assert w.metric("evapi_worker_kamailio_up", node="kam1") == 1


async def test_bad_input_is_counted_and_costs_no_other_event_nor_the_connection() -> None:
    async with world(settle=0.05) as w:
        kam1 = w.servers["kam1"]
        junk = [
            encode(b"{not json"),
            encode(b"[1,2,3]"),
            encode(json.dumps({"event": "call_transferred", "node": "kam1", "ts": 1, "seq": 1}).encode()),
            encode(b"\xff\xfe\x00binary"),
            encode(b'{"event":"register","aor":"\xff\xfe"}'),  # valid JSON shape, not UTF-8
            start(kam1, T0, call_id="bad\r\nVia: x"),
            start(kam1, T0, call_id="evil@x", from_user="a\r\nX-Injected: 1"),
            kam1.event("call_cancelled", T0 + 1, call_id="evil@x", surprise="field"),
            register(kam1, T0 + 2),
        ]
        await kam1.send(b"".join(junk))
        await w.wait_metric("evapi_worker_fake_calls_total", 1, outcome="unsafe")
        assert w.metric("evapi_worker_event_errors_total", node="kam1", reason="invalid_json") == 3
        assert w.metric("evapi_worker_event_errors_total", node="kam1", reason="not_object") == 1
        assert w.metric("evapi_worker_event_errors_total", node="kam1", reason="unknown_type") == 1
        assert w.metric("evapi_worker_event_errors_total", node="kam1", reason="bad_value") == 1
        assert w.metric("evapi_worker_unknown_fields_total", node="kam1", type="call_cancelled") == 1
        assert kam1.accepted == 1 and kam1.streams  # the connection survived
        assert [(d.call_id, d.reason) for d in w.decisions] == [("evil@x", "missed")]
        assert kam1.actions == []  # nothing reached Kamailio for the unsafe call


async def test_events_naming_another_node_are_handled_and_the_misnaming_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "evapi_worker")
    async with world() as w:
        kam1 = w.servers["kam1"]
        kam1.node = "edge-1"  # Kamailio's EVW_NODE; the worker calls this connection kam1
        await kam1.send(start(kam1, T0, call_id="misnamed@x"))
        await w.wait_metric("evapi_worker_events_total", 1, node="kam1", type="call_start")
    assert "node name differs" in caplog.text
    assert "event_node=edge-1" in caplog.text and "name this node edge-1" in caplog.text


async def test_sequence_gaps_are_counted_as_lost_events() -> None:
    async with world() as w:
        kam1 = w.servers["kam1"]
        w.service.protocol.sequences.grace = 0.1
        first = kam1.event("call_answered", T0, call_id="a")
        kam1._seq += 5  # five events Kamailio emitted while nobody listened
        second = kam1.event("call_answered", T0 + 1, call_id="b")
        await kam1.send(first + second)
        await w.wait_metric("evapi_worker_events_lost_total", 5, timeout=5, node="kam1")


async def test_unacknowledged_pin_fails_the_fake_call_without_running_sipp() -> None:
    async with world() as w:
        kam1 = w.servers["kam1"]
        kam1.ack_ok = False
        await kam1.send(start(kam1, T0) + kam1.event("call_cancelled", T0 + 1, call_id="orig-call-1@10.0.0.5"))
        await kam1.send(register(kam1, T0 + 2))
        await w.wait_metric("evapi_worker_fake_calls_total", 1, outcome="failed")
        assert w.metric("evapi_worker_commands_failed_total", node="kam1", command="pin", reason="refused") == 1
        assert w.metric("evapi_worker_sipp_duration_seconds_count") == 0


@needs_sipp
async def test_fake_calls_past_their_deadline_are_dropped_not_sent_late(tmp_path: Path) -> None:
    # One SIPp slot, held by a call to a silent device for six seconds; the
    # other late devices' deadlines (1 s) pass while they wait.
    async with device("device_silent", tmp_path) as dev, world({"kam1": dev.port}, deadline=1.0, settle=0.1) as w:
        w.service.runner.slots.total = 1
        kam1 = w.servers["kam1"]
        await kam1.send(start(kam1, T0) + kam1.event("call_cancelled", T0 + 1, call_id="orig-call-1@10.0.0.5"))
        regs = b"".join(register(kam1, T0 + 2 + i / 10, instance=f"<urn:uuid:{i}>") for i in range(3))
        await kam1.send(regs)
        await w.wait_metric("evapi_worker_fake_calls_total", 2, outcome="overdue", timeout=5)
        assert w.metric("evapi_worker_sipp_running") == 1
        assert len([c for c in kam1.commands if c["cmd"] == "pin"]) == 1


@needs_sipp
async def test_shell_metacharacters_and_separators_reach_sipp_as_inert_text(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    hostile_user = f"a;b$(touch {marker})`touch {marker}`|&>"
    hostile_name = 'Eve $(id) `id` \\\\ \\"x\\"'  # backslashes and an escaped quote, as in a From header
    async with device("phone_rings", tmp_path) as dev, world({"kam1": dev.port}) as w:
        kam1 = w.servers["kam1"]
        await kam1.send(
            start(kam1, T0, from_user=hostile_user, from_name=hostile_name)
            + kam1.event("call_cancelled", T0 + 1, call_id="orig-call-1@10.0.0.5")
            + register(kam1, T0 + 2)
        )
        await w.wait_metric("evapi_worker_fake_calls_total", 1, outcome="completed")
        await dev.finished()
    assert not marker.exists()  # nothing went through a shell
    invite = dev.lines()[0]
    # The user part arrives percent-encoded (';' would have split SIPp's CSV).
    assert "<sip:a%3Bb$(touch%20" in invite
    assert f'from= "{hostile_name}" <sip:' in invite


async def test_an_overloaded_intake_sheds_and_counts_instead_of_backing_up_kamailio() -> None:
    # A burst far larger than the watermark arrives at once: the worker
    # drops (and counts) events unread rather than let Kamailio's writes
    # wait, keeps acknowledgements, notes the shed events' numbers (they are
    # shed, not lost), and decides normally again once it caught up.
    async with world(evapi=EvapiSettings(shed_above=16_384, shed_below=4_096, ping_interval=0)) as w:
        kam1 = w.servers["kam1"]
        burst = b"".join(register(kam1, T0 + i * 1e-4, aor=f"user{i}@example.com") for i in range(3000))
        await kam1.send(burst)
        await w.wait_metric("evapi_worker_events_total", 1, timeout=5, node="kam1", type="register")
        with trio.fail_after(5):
            while (
                w.metric("evapi_worker_events_shed_total", node="kam1")
                + w.metric("evapi_worker_events_total", node="kam1", type="register")
                < 3000
            ):
                await trio.sleep(0.01)
        assert w.metric("evapi_worker_events_shed_total", node="kam1") > 0
        assert w.metric("evapi_worker_events_lost_total", node="kam1") == 0
        assert not w.service.connections["kam1"].shedding
        await kam1.send(start(kam1, T0 + 1))
        await w.wait_metric("evapi_worker_events_total", 1, timeout=5, node="kam1", type="call_start")


async def test_an_action_that_raises_is_its_own_failed_outcome_and_the_worker_serves_on() -> None:
    async with world() as w:
        kam1 = w.servers["kam1"]
        calls = 0

        async def out_of_descriptors(job: object, place: object = None) -> object:
            nonlocal calls
            calls += 1
            raise OSError(24, "Too many open files")

        w.service.runner.run = out_of_descriptors  # type: ignore[assignment]
        for n in range(2):
            call_id = f"boom-{n}@10.0.0.5"
            await kam1.send(start(kam1, T0 + n * 10, call_id=call_id, aor=f"u{n}@example.com"))
            await kam1.send(kam1.event("call_cancelled", T0 + n * 10 + 1, call_id=call_id))
            await kam1.send(register(kam1, T0 + n * 10 + 2, aor=f"u{n}@example.com", instance=f"<urn:uuid:{n}>"))
            await w.wait_metric("evapi_worker_fake_calls_total", n + 1, outcome="failed")
        assert calls == 2
        assert kam1.accepted == 1 and kam1.streams  # the same connection, still read


async def test_labels_and_numbers_from_the_wire_stay_bounded(caplog: pytest.LogCaptureFixture) -> None:
    # A hostile peer on the node's stream: a refused reason the worker does
    # not know, a new one each time, and a sequence number no node reaches.
    caplog.set_level(logging.WARNING, "evapi_worker")
    async with world() as w:
        kam1 = w.servers["kam1"]
        await kam1.send(b"".join(kam1.event("refused", T0, reason=f"made-up-{n}") for n in range(1000)))
        await kam1.send(kam1.event("refused", T0, reason="call_id_nul"))
        await w.wait_metric("evapi_worker_sip_refused_total", 1, node="kam1", reason="call_id_nul")
        kam1._seq = 2**64 - 2  # the next event says 2**64 - 1
        await kam1.send(kam1.event("call_answered", T0 + 1, call_id="after"))
        await w.wait_metric("evapi_worker_event_errors_total", 1, node="kam1", reason="bad_value")
        kam1._seq = 2**31 - 2  # a number a node reaches, but not a second after 1,001
        await kam1.send(kam1.event("call_answered", T0 + 1.001, call_id="jump"))
        await w.wait_metric("evapi_worker_event_errors_total", 1, node="kam1", reason="bad_sequence")
        kam1._seq = 1001
        await kam1.send(kam1.event("call_answered", T0 + 2, call_id="honest"))
        await w.wait_metric("evapi_worker_events_total", 1, node="kam1", type="call_answered")
        assert w.metric("evapi_worker_sip_refused_total", node="kam1", reason="other") == 1000
        assert w.metric("evapi_worker_events_lost_total", node="kam1") == 0
        series = [
            s.labels["reason"]
            for family in w.service.metrics.registry.collect()
            if family.name == "evapi_worker_sip_refused"
            for s in family.samples
        ]
    assert "made-up-1" not in series and len(set(series)) <= 2 * 8
    lines = [r for r in caplog.records if r.getMessage().startswith("sip request refused")]
    assert 1 <= len(lines) <= 4, [r.getMessage() for r in lines]
    assert "said=made-up-0" in lines[0].getMessage()
