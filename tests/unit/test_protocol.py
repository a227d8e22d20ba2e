"""The protocol core: what a frame means and what follows from it (node
routing, the nodes' clocks, sequence numbers), and rate-limited warnings."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import NamedTuple

from hypothesis import given, settings
from hypothesis import strategies as st

from evapi_worker.capture import ClockNote
from evapi_worker.core.clocks import Measured, NodeClocks
from evapi_worker.core.engine import Act, Decision, Engine, EngineSettings
from evapi_worker.core.events import Event, EventErrorReason
from evapi_worker.core.protocol import (
    Acknowledged,
    ClaimNotUsed,
    Decided,
    Protocol,
    Received,
    Rejected,
    SipRefused,
    Skipped,
    decisions_of,
)
from evapi_worker.core.push_book import PushBook
from evapi_worker.logs import AccountTally, Throttle
from evapi_worker.replay import replay_decoded

from ..helpers import Wire

T0 = 1_700_000_000.0


def test_a_node_s_clock_is_the_wall_clock_until_a_quick_ping_measures_it() -> None:
    clocks = NodeClocks(wall_offset=T0 - 100.0)  # engine time 100 is T0 on the wall
    assert clocks.local("kam1", T0 + 2) == 102.0
    # The node is 3 s ahead: it stamped its answer at our 200.05 + 3.
    clocks.ping("kam1", 200.0, 200.1, T0 - 100 + 203.05)
    assert abs(clocks.offset("kam1") - (T0 - 100 + 3)) < 1e-6
    # A slow answer (1 s round trip) says little: the better measure stays.
    clocks.ping("kam1", 300.0, 301.0, T0 - 100 + 300.0)
    assert abs(clocks.offset("kam1") - (T0 - 100 + 3)) < 1e-6
    assert clocks.local("kam2", T0) == 100.0  # other nodes unaffected
    assert clocks.local("kam1", float("inf")) is None


def test_a_register_read_late_has_its_deadline_from_when_it_happened() -> None:
    # (A window longer than the freeze: the ended call is still remembered.)
    wire, engine = Wire(), Engine(EngineSettings(deadline=5, window=30))
    proto = Protocol(engine, NodeClocks(wall_offset=T0))  # engine time 0 is T0
    proto.feed("kam1", wire.start(T0), 0.0)
    proto.feed("kam1", wire.cancelled(T0 + 1), 0.0)
    # Registered at T0 + 2, read 20 s later (a frozen worker).
    (act,) = decisions_of(proto.feed("kam1", wire.register(T0 + 2), 22.0))
    assert isinstance(act, Act) and act.deadline == 7.0  # passed long ago
    # Read in time, the deadline is 5 s after the REGISTER.
    wire2, engine2 = Wire(), Engine(EngineSettings(deadline=5))
    proto2 = Protocol(engine2, NodeClocks(wall_offset=T0))
    proto2.feed("kam1", wire2.start(T0), 0.0)
    proto2.feed("kam1", wire2.cancelled(T0 + 1), 1.0)
    (act2,) = decisions_of(proto2.feed("kam1", wire2.register(T0 + 2), 2.1))
    assert isinstance(act2, Act) and act2.deadline == 7.0
    # A stamp ahead of the worker's clock counts from when it was read.
    wire3, engine3 = Wire(), Engine(EngineSettings(deadline=5))
    proto3 = Protocol(engine3, NodeClocks(wall_offset=T0 - 50))  # the node runs 50 s ahead
    proto3.feed("kam1", wire3.start(T0), 0.0)
    proto3.feed("kam1", wire3.cancelled(T0 + 1), 0.0)
    (act3,) = decisions_of(proto3.feed("kam1", wire3.register(T0 + 2), 0.5))
    assert isinstance(act3, Act) and act3.deadline == 5.5


def test_a_register_belongs_to_the_node_whose_connection_brought_it() -> None:
    wire, engine = Wire(node="edge-a"), Engine()
    proto = Protocol(engine, NodeClocks(wall_offset=T0))
    proto.feed("kam1", wire.start(T0), 0.0)
    proto.feed("kam1", wire.cancelled(T0 + 1), 1.0)
    (act,) = decisions_of(proto.feed("kam1", wire.register(T0 + 2), 2.0))
    assert act.node == "kam1"


def test_a_throttle_says_one_line_per_key_and_second_and_counts_the_rest() -> None:
    throttle: Throttle[str] = Throttle(every=1.0)
    said = [throttle.note("bad", 10.0 + i / 1000) for i in range(500)]
    assert said[0] == 1 and sum(1 for n in said if n) == 1
    assert throttle.note("other", 10.2) == 1  # keys are independent
    assert throttle.due(10.5) == []  # not a second yet
    assert throttle.due(11.0) == [("bad", 499)]
    assert throttle.due(12.0) == []
    assert throttle.note("bad", 12.5) == 1


def test_an_account_tally_logs_a_line_per_kind_and_second_naming_a_bounded_number_of_accounts() -> None:
    tally = AccountTally(every=1.0, max_accounts=3)
    for n in range(10):
        tally.add("token", f"u{n}@x", 1)
    tally.add("token", "u0@x", 5)
    tally.add("provider", "v@x", 2)
    lines = dict(tally.due(10.0, named=2))
    assert lines["token"] == {"count": 15, "accounts": "*:7,u0@x:6", "more_accounts": 2}
    assert lines["provider"] == {"count": 2, "accounts": "v@x:2", "more_accounts": 0}
    tally.add("token", "u1@x", 1)
    assert tally.due(10.5) == []  # not a second yet: kept for the next line
    assert tally.due(11.0) == [("token", {"count": 1, "accounts": "u1@x:1", "more_accounts": 0})]


def test_each_kind_of_frame_is_told_apart_and_only_events_reach_the_engine() -> None:
    wire, engine = Wire(), Engine()
    proto = Protocol(engine, NodeClocks(wall_offset=T0))
    assert isinstance(proto.receive("kam1", wire.raw("cmd_result", T0, id="a-1", ok=True), 0.0), Acknowledged)
    assert isinstance(proto.receive("kam1", wire.raw("claim_unused", T0, claim="c/d"), 0.0), ClaimNotUsed)
    refused = proto.receive("kam1", wire.raw("refused", T0, reason="forged_end", src_ip="192.0.2.1"), 0.0)
    assert isinstance(refused, SipRefused) and decisions_of(refused) == ()
    skipped = proto.receive("kam1", wire.raw("presence", T0), 0.0)
    assert isinstance(skipped, Skipped) and skipped.error.reason is EventErrorReason.UNKNOWN_TYPE
    rejected = proto.receive("kam1", b"{not json", 0.0)
    assert isinstance(rejected, Rejected) and rejected.error.reason is EventErrorReason.INVALID_JSON
    newer = wire.obj("call_start", T0, call_id="c1", aor="bob@x", from_user="a", priority="urgent")
    started = proto.receive("kam1", json.dumps(newer).encode(), 0.0)
    assert isinstance(started, Decided) and started.unknown_fields == ("priority",)
    assert engine.call_count == 1


def _lost(got: Received) -> int:
    assert isinstance(got, Decided)
    return got.lost


def test_sequence_gaps_are_lost_events_but_shed_frames_and_restored_ones_are_not() -> None:
    wire = Wire()
    proto = Protocol(Engine(), NodeClocks(wall_offset=T0))
    proto.sequences.grace = 1.0
    assert _lost(proto.receive("kam1", wire.raw("call_answered", T0, call_id="a"), 0.0)) == 0  # seq 1
    shed = wire.raw("call_answered", T0, call_id="b")  # seq 2, dropped under overload
    assert proto.shed("kam1", shed, 0.1) == 0
    wire.seq += 2  # seq 3 and 4 never arrive
    assert _lost(proto.receive("kam1", wire.raw("call_answered", T0, call_id="e"), 0.2)) == 0  # seq 5
    assert proto.expire(0.5) == []  # may still come, out of order
    assert proto.expire(1.3) == [("kam1", 2)]
    # The journal holds only some of a node's events: restoring them
    # tracks no numbers (else the next live event would open a gap).
    restored = Protocol(Engine(), NodeClocks(wall_offset=T0))
    restored.restore("kam1", Wire().raw("call_answered", T0, call_id="a"), 0.0)
    assert restored.expire(100.0) == []
    assert _lost(restored.receive("kam1", wire.raw("call_answered", T0, call_id="f"), 0.0)) == 0


def test_a_call_start_brings_its_pushes_and_a_misnamed_event_is_told() -> None:
    wire = Wire(node="edge-a")
    book = PushBook(10)
    proto = Protocol(Engine(), NodeClocks(wall_offset=T0), book)
    reg = wire.register(T0, pn_provider="apns", pn_prid="0f" * 32, pn_param="TEAM.org.app.voip")
    got = proto.feed("kam1", reg, 0.0)
    assert got.named == "edge-a" and book.device_count == 1
    started = proto.feed("kam1", wire.start(T0 + 1), 1.0)
    assert isinstance(started, Decided)
    (job,) = started.pushes
    assert job.call_id == "call-1" and job.provider == "apns"


def test_a_lost_call_end_the_engine_does_not_believe_is_told() -> None:
    wire = Wire()
    proto = Protocol(Engine(), NodeClocks(wall_offset=T0))
    proto.feed("kam1", wire.start(T0), 0.0)
    got = proto.feed("kam1", wire.event("call_cancelled", T0 + 1, call_id="call-1", lost=True), 1.0)
    assert isinstance(got, Decided) and got.lost_end_ignored


# -- live, restored and replayed, the same decisions ---------------------------

_SETTINGS = EngineSettings(window=15.0, settle=0.5, deadline=5.0)
_ENDS = ("cancelled", "answered", "failed486", "failed603", None)


class _Ping(NamedTuple):
    """A ping's answer: sent and read (engine time), the node's stamp."""

    sent: float
    received: float
    ts: float


_Item = tuple[float, str, "Event | _Ping"]


@st.composite
def _streams(draw: st.DrawFn) -> list[_Item]:
    """Calls to two accounts ending in every way (or ringing on), devices
    registering before, during and after them (some twice), on two nodes,
    each event read up to 1.2 s after it happened: events from Kamailio's
    processes arrive in any order, and a REGISTER races its call's end
    within the settle delay. kam2's clock is off by up to 4 s, and pings
    measure it at random moments (before them, its stamps are taken as
    the wall clock's)."""
    wires = {"kam1": Wire(node="kam1"), "kam2": Wire(node="kam2")}
    skew = {"kam1": 0.0, "kam2": draw(st.floats(-4.0, 4.0))}
    items: list[_Item] = []

    def add(node: str, ts: float, event: Event) -> None:
        items.append((ts - T0 - skew[node] + draw(st.floats(0.0, 1.2)), node, event))

    for n in range(draw(st.integers(1, 3))):
        aor = draw(st.sampled_from(["bob@x", "carol@x"]))
        node = draw(st.sampled_from(sorted(wires)))
        start = T0 + skew[node] + draw(st.floats(0.0, 5.0))
        add(node, start, wires[node].start(start, call_id=f"c{n}", aor=aor))
        end = draw(st.sampled_from(_ENDS))
        if end is not None:
            ts = start + draw(st.floats(0.1, 20.0))
            event = (
                wires[node].failed(ts, int(end[6:]), call_id=f"c{n}", aor=aor)
                if end.startswith("failed")
                else getattr(wires[node], end)(ts, call_id=f"c{n}", aor=aor)
            )
            add(node, ts, event)
    for aor in ("bob@x", "carol@x"):
        for d in range(draw(st.integers(0, 2))):
            for _ in range(draw(st.integers(1, 2))):
                node = draw(st.sampled_from(sorted(wires)))
                ts = T0 + skew[node] + draw(st.floats(0.0, 40.0))
                contact = f"sip:d{d}@192.0.2.{d + 10}:5060"
                add(node, ts, wires[node].register(ts, aor=aor, instance=f"<urn:uuid:{aor}-{d}>", contact=contact))
    for _ in range(draw(st.integers(0, 3))):
        received = draw(st.floats(0.0, 40.0))
        sent = received - draw(st.floats(0.001, 0.2))
        items.append((received, "kam2", _Ping(sent, received, T0 + (sent + received) / 2 + skew["kam2"])))
    return sorted(items, key=lambda item: item[0])


def _key(decisions: list[Decision], clock: float = 0.0) -> list[tuple[str, str, str, str, str, float]]:
    """What was decided, and an action's deadline (on the engine's clock:
    ``clock`` is the wall time of its zero, replay's engine runs on the
    wall clock), which counts from when the REGISTER happened."""
    return sorted(
        (
            d.call_id,
            d.aor,
            d.device,
            d.action.value,
            str(d.reason),
            round(d.deadline - clock, 6) if isinstance(d, Act) else 0.0,
        )
        for d in decisions
    )


def _protocol() -> Protocol:
    return Protocol(Engine(_SETTINGS), NodeClocks(wall_offset=T0))


def _live(stream: list[_Item], proto: Protocol | None = None, kept: list[Measured] | None = None) -> list[Decision]:
    """As the live worker: its timer ticks at every deadline, each event is
    read when it arrives; the clock measurements it used are ``kept`` (as
    the journal and the capture keep them)."""
    proto = proto or _protocol()
    out: list[Decision] = []
    for now, node, event in stream:
        while (due := proto.next_deadline()) is not None and due <= now:
            out += proto.tick(due)
        if isinstance(event, _Ping):
            measured = proto.ping(node, event.sent, event.received, event.ts)
            if measured is not None and kept is not None:
                kept.append(measured)
            continue
        out += decisions_of(proto.feed(node, event, now))
    return out


def _fed(stream: list[_Item], kept: list[Measured], proto: Protocol | None = None) -> list[Decision]:
    """As a restore from the journal: the events alone, no timer between
    them, the clock measurements the live worker kept where they were."""
    proto = proto or _protocol()
    out: list[Decision] = []
    measured = {m.at: m for m in kept}
    for now, node, event in stream:
        if isinstance(event, _Ping):
            if (m := measured.get(event.received)) is not None:
                proto.measured(m.node, m.offset, m.uncertainty, m.at)
            continue
        out += decisions_of(proto.feed(node, event, now))
    return out


def _captured(stream: list[_Item], kept: list[Measured]) -> Iterator[tuple[float, str, Event | ClockNote]]:
    """The stream as a capture holds it: receive times on the wall clock,
    the clock measurements as notes (the node's clock against the wall)."""
    measured = {m.at: m for m in kept}
    for now, node, event in stream:
        if isinstance(event, _Ping):
            if (m := measured.get(event.received)) is not None:
                yield T0 + m.at, "", ClockNote(T0 + m.at, m.node, m.offset - T0, m.uncertainty)
            continue
        yield T0 + now, node, event


@settings(max_examples=300, deadline=None)
@given(stream=_streams(), cut=st.floats(0.0, 1.0))
def test_live_restored_and_replayed_the_same_events_give_the_same_decisions(stream: list[_Item], cut: float) -> None:
    end = (stream[-1][0] if stream else 0.0) + 600
    proto = _protocol()
    kept: list[Measured] = []
    live = _live(stream, proto, kept) + proto.tick(end)
    restored_proto = _protocol()
    restored = _fed(stream, kept, restored_proto) + restored_proto.tick(end)
    # Replay runs on the receive times as unix times (a capture's).
    replayed = replay_decoded(_captured(stream, kept), _SETTINGS).decisions
    assert _key(restored) == _key(live)
    assert _key(replayed, T0) == _key(live)
    # A crash at any point: what the first run decided, then a restart from
    # its state (snapshot) fed the rest without a timer.
    k = int(cut * len(stream))
    first = _protocol()
    before = _live(stream[:k], first)
    second = _protocol()
    second.engine.import_state(first.engine.export_state())
    for m in (m for m in kept if m.at <= (stream[k - 1][0] if k else -1.0)):
        second.measured(m.node, m.offset, m.uncertainty, m.at)  # a snapshot's journal keeps them
    after = _fed(stream[k:], kept, second) + second.tick(end)
    assert _key(before + after) == _key(live)


def test_a_cancel_stamped_before_a_register_but_read_after_its_settle_delay_is_decided_alike() -> None:
    """The traced case: a REGISTER while the call rings waits the settle
    delay; live, the timer decides "ringing" before the CANCEL (stamped
    before the REGISTER) is read a second later. A restore feeding the same
    events without a timer decides the same, not a fake call."""
    wire = Wire()
    stream: list[_Item] = [
        (0.0, "kam1", wire.start(T0)),
        (2.0, "kam1", wire.register(T0 + 2.0)),
        (3.0, "kam1", wire.cancelled(T0 + 1.9)),
    ]
    live_proto = _protocol()
    live = _live(stream, live_proto) + live_proto.tick(100.0)
    fed_proto = _protocol()
    fed = _fed(stream, [], fed_proto) + fed_proto.tick(100.0)
    assert [(d.action.value, str(d.reason)) for d in live] == [("none", "ringing")]
    assert _key(fed) == _key(live)
