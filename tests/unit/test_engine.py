"""The late-registration engine: decisions as a function of events and time."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evapi_worker.core.engine import (
    MAX_PUSHED,
    Act,
    Action,
    Anchor,
    Decision,
    EndKind,
    Engine,
    EngineSettings,
    Strategy,
)
from evapi_worker.core.events import Event

from ..helpers import Wire

T0 = 1_700_000_000.0  # Kamailio wall clock


def run(engine: Engine, *steps: tuple[float, Event]) -> list[Decision]:
    """Feed (arrival time, event) pairs, ticking the engine in between."""
    out: list[Decision] = []
    for now, event in steps:
        out += engine.tick(now)
        out += engine.handle(event, now)
    return out


def actions(decisions: list[Decision]) -> list[tuple[str, str, str]]:
    return [(d.call_id, d.device, d.reason) for d in decisions if d.action is not Action.NONE]


def test_answered_elsewhere_then_late_register_gets_one_fake_call() -> None:
    w, e = Wire(), Engine()
    out = run(e, (0.0, w.start(T0)), (3.0, w.answered(T0 + 3)), (5.0, w.register(T0 + 5)))
    assert len(out) == 1
    d = out[0]
    assert isinstance(d, Act)
    assert (d.action, d.reason, d.call_id, d.device, d.node) == (
        Action.FAKE_CALL, "answered", "call-1", "urn:uuid:iphone-1", "kam1",
    )  # fmt: skip
    assert d.since_start == 5.0 and d.since_end == 2.0
    assert d.call.end is EndKind.ANSWERED
    assert d.call.from_user == "alice" and d.call.from_name == "Alice"
    assert d.register.contact.startswith("sip:bob@")
    assert d.deadline == 5.0 + EngineSettings().deadline


@pytest.mark.parametrize(
    ("code", "reason", "kind"),
    [
        (None, "missed", EndKind.CANCELLED),
        (603, "declined", EndKind.DECLINED),
        (600, "declined", EndKind.DECLINED),
        (486, "missed", EndKind.FAILED),
        (408, "missed", EndKind.FAILED),
    ],
)
def test_how_the_call_ended_picks_the_reason(code: int | None, reason: str, kind: EndKind) -> None:
    w, e = Wire(), Engine()
    end = w.cancelled(T0 + 2) if code is None else w.failed(T0 + 2, code)
    out = run(e, (0.0, w.start(T0)), (2.0, end), (4.0, w.register(T0 + 4)))
    assert [(d.action, d.reason) for d in out] == [(Action.FAKE_CALL, reason)]
    assert isinstance(out[0], Act) and out[0].call.end is kind


def test_register_while_ringing_waits_the_settle_delay_then_leaves_it_to_tsilo() -> None:
    w, e = Wire(), Engine(EngineSettings(settle=0.5))
    assert run(e, (0.0, w.start(T0)), (2.0, w.register(T0 + 2))) == []
    assert e.next_deadline() == 2.5
    assert e.tick(2.4) == []
    out = e.tick(2.5)
    assert [(d.action, d.reason, d.since_end) for d in out] == [(Action.NONE, "ringing", None)]
    # The call ending later changes nothing for this device.
    assert run(e, (9.0, w.cancelled(T0 + 9)), (10.0, w.register(T0 + 10))) == []


def test_end_stamped_before_the_register_but_arriving_after_it_still_gives_the_call() -> None:
    # Two SIP worker processes: the CANCEL was handled first, its event came second.
    w, e = Wire(), Engine(EngineSettings(settle=0.5))
    start, register, cancel = w.start(T0), w.register(T0 + 3.000), w.cancelled(T0 + 2.999)
    out = run(e, (0.0, start), (3.000, register), (3.002, cancel))
    assert actions(out) == [("call-1", "urn:uuid:iphone-1", "missed")]
    assert e.tick(10.0) == []  # the pending settle produced nothing more


def test_end_stamped_after_the_register_resolves_as_ringing_at_once() -> None:
    w, e = Wire(), Engine()
    out = run(e, (0.0, w.start(T0)), (3.0, w.register(T0 + 3)), (3.1, w.answered(T0 + 3.1)))
    assert [(d.action, d.reason) for d in out] == [(Action.NONE, "ringing")]


def test_register_arriving_before_the_call_events_is_reconsidered() -> None:
    w, e = Wire(), Engine()
    start, end, register = w.start(T0), w.answered(T0 + 1), w.register(T0 + 1.5)
    out = run(e, (0.0, register), (0.001, start), (0.002, end))
    assert actions(out) == [("call-1", "urn:uuid:iphone-1", "answered")]


def test_end_arriving_before_start_is_kept_until_the_start_comes() -> None:
    w, e = Wire(), Engine()
    start, end = w.start(T0), w.cancelled(T0 + 1)
    out = run(e, (0.0, end), (0.001, start), (2.0, w.register(T0 + 2)))
    assert actions(out) == [("call-1", "urn:uuid:iphone-1", "missed")]


def test_window_anchored_at_the_end() -> None:
    w, e = Wire(), Engine(EngineSettings(window=15, anchor=Anchor.END))
    out = run(e, (0.0, w.start(T0)), (40.0, w.cancelled(T0 + 40)), (55.0, w.register(T0 + 55)))
    assert actions(out) == [("call-1", "urn:uuid:iphone-1", "missed")]
    w, e = Wire(), Engine(EngineSettings(window=15, anchor=Anchor.END))
    out = run(e, (0.0, w.start(T0)), (40.0, w.cancelled(T0 + 40)), (55.2, w.register(T0 + 55.2)))
    assert [(d.action, d.reason) for d in out] == [(Action.NONE, "too_late")]


def test_default_window_is_15_s_from_the_push_as_liblinphone_times_it() -> None:
    assert (EngineSettings().window, EngineSettings().anchor) == (15.0, Anchor.START)


def test_window_anchored_at_the_start() -> None:
    w, e = Wire(), Engine(EngineSettings(window=15, anchor=Anchor.START))
    out = run(e, (0.0, w.start(T0)), (10.0, w.cancelled(T0 + 10)), (16.0, w.register(T0 + 16)))
    assert [(d.action, d.reason, d.since_start) for d in out] == [(Action.NONE, "too_late", 16.0)]
    w, e = Wire(), Engine(EngineSettings(window=15, anchor=Anchor.START))
    out = run(e, (0.0, w.start(T0)), (10.0, w.cancelled(T0 + 10)), (14.0, w.register(T0 + 14)))
    assert actions(out) == [("call-1", "urn:uuid:iphone-1", "missed")]


def test_non_push_device_gets_nothing() -> None:
    w, e = Wire(), Engine()
    desk = w.register(T0 + 4, user_agent="Yealink SIP-T46U", instance="<urn:uuid:desk>")
    out = run(e, (0.0, w.start(T0)), (2.0, w.answered(T0 + 2)), (4.0, desk))
    assert out == []
    assert e.device_count == 0  # non-push devices are not kept


def test_push_provider_apns_marks_a_push_device_whatever_its_user_agent() -> None:
    w, e = Wire(), Engine()
    reg = w.register(T0 + 4, user_agent="MyApp/1.0", instance=None, pn_provider="apns.dev", pn_prid="tok:voip")
    out = run(e, (0.0, w.start(T0)), (2.0, w.answered(T0 + 2)), (4.0, reg))
    assert actions(out) == [("call-1", "pn-prid:tok:voip", "answered")]


def test_same_device_registering_again_gets_no_second_call() -> None:
    w, e = Wire(), Engine()
    out = run(
        e,
        (0.0, w.start(T0)),
        (2.0, w.answered(T0 + 2)),
        (4.0, w.register(T0 + 4)),
        (5.0, w.register(T0 + 5)),
    )
    assert [(d.action, d.reason) for d in out] == [(Action.FAKE_CALL, "answered"), (Action.NONE, "duplicate")]


def test_two_devices_on_one_account_get_one_call_each() -> None:
    w, e = Wire(), Engine()
    out = run(
        e,
        (0.0, w.start(T0)),
        (2.0, w.cancelled(T0 + 2)),
        (4.0, w.register(T0 + 4, instance="<urn:uuid:iphone-1>")),
        (4.5, w.register(T0 + 4.5, instance="<urn:uuid:iphone-2>")),
        (5.0, w.register(T0 + 5, instance="<urn:uuid:iphone-2>")),
    )
    assert actions(out) == [("call-1", "urn:uuid:iphone-1", "missed"), ("call-1", "urn:uuid:iphone-2", "missed")]


def test_device_identity_falls_back_to_pn_prid_then_contact() -> None:
    w, e = Wire(), Engine()
    out = run(
        e,
        (0.0, w.start(T0)),
        (2.0, w.cancelled(T0 + 2)),
        (4.0, w.register(T0 + 4, instance=None, pn_prid="tok")),
        (4.1, w.register(T0 + 4.1, instance=None, contact="sip:bob@10.0.0.9:5062")),
    )
    assert [d.device for d in out] == ["pn-prid:tok", "sip:bob@10.0.0.9:5062"]


def test_registered_before_the_call_started_is_not_concerned() -> None:
    w, e = Wire(), Engine()
    reg = w.register(T0 - 1)
    out = run(e, (0.0, w.start(T0)), (0.001, reg), (2.0, w.answered(T0 + 2)))
    assert out == []


def test_other_accounts_are_not_concerned() -> None:
    w, e = Wire(), Engine()
    out = run(e, (0.0, w.start(T0)), (2.0, w.answered(T0 + 2)), (3.0, w.register(T0 + 3, aor="carol@example.com")))
    assert out == []


def test_unregister_wakes_no_one() -> None:
    w, e = Wire(), Engine()
    out = run(e, (0.0, w.start(T0)), (2.0, w.answered(T0 + 2)), (3.0, w.register(T0 + 3, expires=0)))
    assert out == []


def test_earliest_end_decides_how_the_call_ended() -> None:
    # The CANCEL was stamped first; its 487 final response event arrived first.
    w, e = Wire(), Engine()
    out = run(
        e,
        (0.0, w.start(T0)),
        (2.0, w.failed(T0 + 2.01, 487)),
        (2.0, w.answered(T0 + 2.00)),
        (4.0, w.register(T0 + 4)),
    )
    assert [(d.reason, d.since_end) for d in out] == [("answered", 2.0)]


def test_message_strategy_decides_messages() -> None:
    w, e = Wire(), Engine(EngineSettings(strategy=Strategy.MESSAGE))
    out = run(e, (0.0, w.start(T0)), (2.0, w.answered(T0 + 2)), (4.0, w.register(T0 + 4)))
    assert [(d.action, d.reason) for d in out] == [(Action.MESSAGE, "answered")]


def test_several_late_calls_for_one_device_each_get_their_fake_call() -> None:
    w, e = Wire(), Engine()
    out = run(
        e,
        (0.0, w.start(T0, call_id="a")),
        (1.0, w.cancelled(T0 + 1, call_id="a")),
        (2.0, w.start(T0 + 2, call_id="b")),
        (3.0, w.answered(T0 + 3, call_id="b")),
        (4.0, w.register(T0 + 4)),
    )
    assert sorted(actions(out)) == [("a", "urn:uuid:iphone-1", "missed"), ("b", "urn:uuid:iphone-1", "answered")]


def test_state_expires_after_the_window() -> None:
    w, e = Wire(), Engine(EngineSettings(window=15, settle=0.5, deadline=5, ring_timeout=60))
    run(e, (0.0, w.start(T0)), (2.0, w.answered(T0 + 2)), (3.0, w.register(T0 + 3)))
    assert (e.call_count, e.device_count) == (1, 1)
    e.tick(8.1)
    assert e.device_count == 0
    e.tick(2.0 + 15.5)
    assert e.call_count == 0
    assert e.tick(60.0) == []  # the superseded ring timeout fires harmlessly
    assert e.next_deadline() is None
    run(e, (100.0, w.start(T0 + 100, call_id="ringing-forever")))
    e.tick(159.9)
    assert e.call_count == 1
    e.tick(160.0)
    assert e.call_count == 0


def test_memory_is_bounded_and_evictions_counted() -> None:
    w, e = Wire(), Engine(EngineSettings(max_calls=3, max_devices=2))
    for i in range(5):
        e.handle(w.start(T0 + i, call_id=f"c{i}", aor=f"u{i}@x"), float(i))
    assert e.call_count == 3 and e.evicted_calls == 2
    for i in range(4):
        e.handle(w.register(T0 + 10 + i, aor=f"u{i}@x"), 10.0 + i)
    assert e.device_count == 2 and e.evicted_devices == 2


# -- invariants under arbitrary event orders ----------------------------------

event_steps = st.lists(
    st.tuples(
        st.sampled_from(["start", "answered", "cancelled", "failed6", "failed4", "register"]),
        st.sampled_from(["c1", "c2"]),
        st.sampled_from(["<urn:uuid:d1>", "<urn:uuid:d2>"]),
        st.floats(0, 40, allow_nan=False),  # Kamailio time offset
        st.floats(0, 0.3, allow_nan=False),  # arrival jitter
    ),
    max_size=25,
)


@settings(max_examples=300, deadline=None)
@given(event_steps)
def test_invariants_one_action_per_pair_and_none_for_ringing_calls(
    steps: list[tuple[str, str, str, float, float]],
) -> None:
    w, e = Wire(), Engine(EngineSettings(window=15, settle=0.5))
    # A call's end is never stamped before its start: end offsets count from
    # the start. Kamailio emits one call_start per initial INVITE (a Call-ID
    # reused after its state expired would be a new call).
    start_at: dict[str, float] = {}
    for kind, call_id, _, offset, _ in steps:
        if kind == "start":
            start_at.setdefault(call_id, offset)
    events = []
    started: set[str] = set()
    for kind, call_id, dev, offset, jitter in steps:
        base = T0 + start_at.get(call_id, 0.0)
        if kind == "start":
            if call_id in started:
                continue
            started.add(call_id)
            ev = w.start(T0 + offset, call_id=call_id)
            offset = start_at[call_id]
        elif kind == "answered":
            ev = w.answered(base + offset, call_id=call_id)
            offset += start_at.get(call_id, 0.0)
        elif kind == "cancelled":
            ev = w.cancelled(base + offset, call_id=call_id)
            offset += start_at.get(call_id, 0.0)
        elif kind == "failed6":
            ev = w.failed(base + offset, 603, call_id=call_id)
            offset += start_at.get(call_id, 0.0)
        elif kind == "failed4":
            ev = w.failed(base + offset, 486, call_id=call_id)
            offset += start_at.get(call_id, 0.0)
        else:
            ev = w.register(T0 + offset, instance=dev)
        events.append((offset + jitter, ev))
    events.sort(key=lambda pair: pair[0])
    out = run(e, *events) + e.tick(1000.0)
    pairs = [(d.call_id, d.device) for d in out if d.action is not Action.NONE]
    assert len(pairs) == len(set(pairs))
    # Ground truth from Kamailio's timestamps: first start and first end.
    starts: dict[str, float] = {}
    for _, ev in events:
        if type(ev).__name__ == "CallStarted":
            starts.setdefault(ev.call_id, ev.ts)  # type: ignore[union-attr]
    ends: dict[str, float] = {}
    for _, ev in events:
        if type(ev).__name__ in ("CallAnswered", "CallCancelled", "CallFailed"):
            call_id = ev.call_id  # type: ignore[union-attr]
            ends[call_id] = min(ends.get(call_id, ev.ts), ev.ts)
    for d in out:
        if d.action is Action.NONE:
            continue
        assert d.call_id in ends and ends[d.call_id] <= d.ts, "a fake call for a call still ringing"
        assert d.ts >= starts[d.call_id]
        assert d.ts - ends[d.call_id] <= 15


CONTACT = "sip:bob@192.0.2.10:50000;transport=udp"


def test_a_device_that_rang_with_the_real_call_gets_no_fake_call() -> None:
    w, e = Wire(), Engine()
    out = run(
        e,
        (0.0, w.start(T0)),
        (0.1, w.branch_reply(T0 + 0.1, CONTACT)),  # the awake iPhone rang
        (3.0, w.cancelled(T0 + 3)),
        (4.0, w.register(T0 + 4)),  # the app re-registers, same Contact
    )
    assert [(d.action, d.reason) for d in out] == [(Action.NONE, "rang")]


def test_rang_is_matched_by_instance_when_the_contact_changed() -> None:
    w, e = Wire(), Engine()
    out = run(
        e,
        (0.0, w.register(T0 - 60)),  # registered (awake) before the call
        (1.0, w.start(T0)),
        (1.1, w.branch_reply(T0 + 0.1, CONTACT)),
        (3.0, w.answered(T0 + 2)),
        # Woken again, from a new port: a new Contact, the same +sip.instance.
        (4.0, w.register(T0 + 3, contact="sip:bob@192.0.2.10:50001;transport=udp")),
    )
    assert [(d.action, d.reason) for d in out] == [(Action.NONE, "rang")]


def test_rang_is_matched_by_push_token_from_the_contact() -> None:
    w, e = Wire(), Engine()
    out = run(
        e,
        (0.0, w.start(T0)),
        (0.1, w.branch_reply(T0 + 0.1, "sip:x@192.0.2.10:5060;pn-provider=apns;pn-prid=TOKEN1", code=486)),
        (3.0, w.answered(T0 + 2)),
        (4.0, w.register(T0 + 3, instance=None, contact="sip:y@192.0.2.11:6000", pn_prid="TOKEN1")),
    )
    assert [(d.action, d.reason) for d in out] == [(Action.NONE, "rang")]


def test_another_device_of_the_account_still_gets_its_fake_call() -> None:
    w, e = Wire(), Engine()
    out = run(
        e,
        (0.0, w.start(T0)),
        (0.1, w.branch_reply(T0 + 0.1, "sip:desk@192.0.2.20:5060")),
        (3.0, w.answered(T0 + 2)),
        (4.0, w.register(T0 + 3)),
    )
    assert actions(out) == [("call-1", "urn:uuid:iphone-1", "answered")]


def test_evicting_an_accounts_only_device_for_its_new_one_keeps_the_count_true() -> None:
    # At the bound, bob's new device evicts the oldest device: bob's only one.
    w, e = Wire(), Engine(EngineSettings(max_devices=1))
    run(e, (0.0, w.register(T0, instance="<urn:uuid:old>")))
    run(e, (1.0, w.register(T0 + 1, instance="<urn:uuid:new>")))
    assert e.device_count == 1 and e.evicted_devices == 1
    # The new device is where a call finds it.
    out = run(
        e, (2.0, w.start(T0 + 2)), (2.5, w.cancelled(T0 + 2.5)), (3.0, w.register(T0 + 3, instance="<urn:uuid:new>"))
    )
    assert actions(out) == [("call-1", "urn:uuid:new", "missed")]
    for n in range(5):  # and eviction goes on without ever finding nothing to evict
        run(e, (4.0 + n, w.register(T0 + 4 + n, aor=f"u{n}@example.com", instance=f"<urn:uuid:{n}>")))
    assert e.device_count == 1


def test_branch_replies_kept_per_call_are_bounded() -> None:
    w, e = Wire(), Engine()
    run(e, (0.0, w.start(T0)))
    for i in range(500):
        e.handle(w.branch_reply(T0 + 0.1, f"sip:dev{i}@10.0.0.1:5060;pn-prid=TOKEN{i}"), 0.1)
    (call,) = e.export_state().calls
    assert 16 <= len(call.rang) < 20  # the last reply may add a contact, its token and its device


def test_lost_cancel_after_the_node_restarted_ends_the_call_and_the_late_phone_gets_a_missed_call() -> None:
    before, after = Wire(boot=1700000000), Wire(boot=1700000050)
    e = Engine()
    out = run(
        e,
        (0.0, before.start(T0)),
        # The node restarted; the caller's CANCEL found no transaction there.
        (2.0, after.event("call_cancelled", T0 + 2, call_id="call-1", lost=True)),
        (3.0, after.register(T0 + 3)),
    )
    assert [(d.action, d.reason) for d in out] == [(Action.FAKE_CALL, "missed")]
    assert e.lost_ends_ignored == 0


def test_lost_end_from_the_run_that_still_has_the_call_is_not_believed() -> None:
    # A CANCEL that matches no transaction on the node that has the call is
    # a stranger's (a real CANCEL would have matched): the call still rings.
    w, e = Wire(), Engine()
    out = run(
        e,
        (0.0, w.start(T0)),
        (1.0, w.event("call_cancelled", T0 + 1, call_id="call-1", lost=True)),
        (1.5, w.event("call_answered", T0 + 1.5, call_id="call-1", lost=True)),
        (2.0, w.register(T0 + 2)),
    )
    out += e.tick(10.0)
    assert [(d.action, d.reason) for d in out] == [(Action.NONE, "ringing")]
    assert e.lost_ends_ignored == 2


def test_lost_end_of_an_unknown_call_starts_nothing() -> None:
    w, e = Wire(), Engine()
    assert e.handle(w.event("call_failed", T0, call_id="nobody", code=486, lost=True), 0.0) == []
    assert e.lost_ends_ignored == 1


# -- one account's calls and devices cost only that account -----------------


def test_a_strangers_call_with_the_same_call_id_ends_nothing_of_yours() -> None:
    # Mallory calls carol with the Call-ID of alice's call to bob, and cancels.
    w, e = Wire(), Engine(EngineSettings(settle=0.5))
    out = run(
        e,
        (0.0, w.start(T0, call_id="shared", aor="bob@example.com")),
        (1.0, w.start(T0 + 1, call_id="shared", aor="carol@example.com")),
        (2.0, w.cancelled(T0 + 2, call_id="shared", aor="carol@example.com")),
        (3.0, w.register(T0 + 3)),  # bob's iPhone wakes while alice's call still rings
    )
    out += e.tick(10.0)
    assert [(d.action, d.reason) for d in out] == [(Action.NONE, "ringing")]
    assert e.ringing("shared", "bob@example.com") and not e.ringing("shared", "carol@example.com")


def test_a_strangers_call_first_does_not_swallow_yours() -> None:
    w, e = Wire(), Engine()
    out = run(
        e,
        (0.0, w.start(T0, call_id="shared", aor="carol@example.com")),
        (0.5, w.answered(T0 + 0.5, call_id="shared", aor="carol@example.com")),
        (1.0, w.start(T0 + 1, call_id="shared", aor="bob@example.com")),
        (2.0, w.cancelled(T0 + 2, call_id="shared", aor="bob@example.com")),
        (4.0, w.register(T0 + 4)),
    )
    assert [(d.call_id, d.aor, d.reason) for d in out if isinstance(d, Act)] == [
        ("shared", "bob@example.com", "missed")
    ]
    act = out[-1]
    assert isinstance(act, Act) and act.call.aor == "bob@example.com" and act.call.end is EndKind.CANCELLED


def test_ends_from_routes_that_do_not_name_the_account_still_end_the_call() -> None:
    w, e = Wire(), Engine()
    out = run(e, (0.0, w.start(T0)), (2.0, w.cancelled(T0 + 2, aor=None)), (3.0, w.register(T0 + 3)))
    assert actions(out) == [("call-1", "urn:uuid:iphone-1", "missed")]
    # And an end with no account that came before its start is joined by it.
    w, e = Wire(), Engine()
    out = run(e, (0.0, w.answered(T0 + 1, aor=None)), (0.1, w.start(T0)), (3.0, w.register(T0 + 3)))
    assert actions(out) == [("call-1", "urn:uuid:iphone-1", "answered")]


def test_an_accounts_flood_of_calls_evicts_its_own_oldest_never_anothers() -> None:
    w, e = Wire(), Engine(EngineSettings(max_calls_per_account=4))
    e.handle(w.start(T0, call_id="bobs", aor="bob@example.com"), 0.0)
    for i in range(10):
        e.handle(w.start(T0 + i, call_id=f"flood-{i}", aor="mallory@example.com"), 0.1 * i)
    assert e.call_count == 5 and e.evicted_calls == 6
    assert e.ringing("bobs", "bob@example.com")
    assert e.take_evictions() == {("calls", "mallory@example.com"): 6}
    assert e.take_evictions() == {}
    out = run(e, (2.0, w.cancelled(T0 + 2, call_id="bobs")), (3.0, w.register(T0 + 3)))
    assert actions(out) == [("bobs", "urn:uuid:iphone-1", "missed")]


def test_an_accounts_flood_of_devices_evicts_its_own_oldest_never_anothers() -> None:
    w, e = Wire(), Engine(EngineSettings(max_devices_per_account=3, deadline=60))
    run(e, (0.0, w.register(T0, aor="bob@example.com")))
    for i in range(10):
        run(e, (0.1 * i, w.register(T0 + i, aor="mallory@example.com", instance=f"<urn:uuid:m{i}>",
                                     contact=f"sip:m{i}@192.0.2.1:5060")))  # fmt: skip
    assert e.device_count == 4 and e.evicted_devices == 7
    evictions = e.take_evictions()
    assert evictions == {("devices", "mallory@example.com"): 7, ("contacts", "mallory@example.com"): 7}
    out = run(e, (2.0, w.start(T0 + 20)), (3.0, w.cancelled(T0 + 21)), (4.0, w.register(T0 + 22)))
    assert actions(out) == [("call-1", "urn:uuid:iphone-1", "missed")]


# -- a device this worker pushed: its deadline counts from the push ----------


def test_a_pushed_device_is_served_until_its_push_can_have_arrived_and_a_window_more() -> None:
    # The push was accepted 0.05 s into the call; Apple may hold it 30 s for
    # a phone in a tunnel. The caller gave up at 1 s.
    w, e = Wire(), Engine(EngineSettings(window=15.0))
    run(e, (0.0, w.start(T0)))
    assert e.pushed("call-1", "bob@example.com", "urn:uuid:iphone-1", 30.0, 0.05)
    run(e, (1.0, w.cancelled(T0 + 1)))
    # Long past the window from the start, the push delivered at 20 s: the fake call.
    out = run(e, (20.5, w.register(T0 + 20.5)))
    assert actions(out) == [("call-1", "urn:uuid:iphone-1", "missed")]
    # Another device of the account, not pushed by this worker: today's window.
    out = run(e, (21.0, w.register(T0 + 21, instance="<urn:uuid:ipad>", contact="sip:ipad@192.0.2.11:5060")))
    assert [(d.device, d.reason) for d in out] == [("urn:uuid:ipad", "too_late")]


def test_a_pushed_device_registering_after_its_push_expired_and_a_window_gets_nothing() -> None:
    w, e = Wire(), Engine(EngineSettings(window=15.0))
    run(e, (0.0, w.start(T0)))
    e.pushed("call-1", "bob@example.com", "urn:uuid:iphone-1", 30.0, 0.05)
    run(e, (1.0, w.cancelled(T0 + 1)))
    # The call is remembered until then (not the window's 16.5 s)...
    assert e.tick(45.0) == [] and e.call_count == 1
    out = run(e, (45.1, w.register(T0 + 45.1)))
    assert [(d.action, d.reason) for d in out] == [(Action.NONE, "too_late")]
    # ...and forgotten after it.
    e.tick(46.0)
    assert e.call_count == 0


def test_a_pushed_device_waking_while_the_call_rings_gets_the_real_call() -> None:
    w, e = Wire(), Engine(EngineSettings(window=15.0, settle=0.5))
    run(e, (0.0, w.start(T0)))
    e.pushed("call-1", "bob@example.com", "urn:uuid:iphone-1", 30.0, 0.05)
    out = run(e, (20.0, w.register(T0 + 20)), (20.5, w.cancelled(T0 + 25)))
    assert [(d.action, d.reason) for d in out] == [(Action.NONE, "ringing")]


def test_pushes_survive_export_and_import_on_another_clock() -> None:
    w, e = Wire(), Engine(EngineSettings(window=15.0))
    run(e, (0.0, w.start(T0)), (1.0, w.cancelled(T0 + 1)))
    e.pushed("call-1", "bob@example.com", "urn:uuid:iphone-1", 30.0, 0.05)
    state = e.export_state()
    assert state.calls[0].pushed == {"urn:uuid:iphone-1": 45.05}
    again = Engine(EngineSettings(window=15.0))
    again.import_state(state.shifted(100.0))  # a new process whose clock reads 100 s more
    out = run(again, (120.5, w.register(T0 + 20.5)))
    assert actions(out) == [("call-1", "urn:uuid:iphone-1", "missed")]
    # A push for a call the engine does not know is not kept.
    assert not again.pushed("nobody", "bob@example.com", "urn:uuid:iphone-1", 30.0, 121.0)


def test_a_restored_call_keeps_every_pushed_device_up_to_its_bound() -> None:
    w, e = Wire(), Engine(EngineSettings(window=15.0))
    run(e, (0.0, w.start(T0)))
    for n in range(MAX_PUSHED + 5):
        e.pushed("call-1", "bob@example.com", f"urn:uuid:d{n}", 30.0, 0.05)
    (call,) = e.export_state().calls
    assert len(call.pushed) == MAX_PUSHED
    again = Engine(EngineSettings(window=15.0))
    again.import_state(e.export_state())
    assert again.export_state().calls[0].pushed == call.pushed
