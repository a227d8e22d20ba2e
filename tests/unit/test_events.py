"""Event protocol v1: parsing and the errors that name what is wrong."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from evapi_worker.core.events import (
    BranchReply,
    CallCancelled,
    CallFailed,
    CallStarted,
    CommandResult,
    EventError,
    Refused,
    Register,
    UnknownEventError,
    decode_event,
    event_type,
    normalize_aor,
    parse_event,
)

from ..helpers import Wire


def reason_of(payload: bytes | str) -> str:
    with pytest.raises(EventError) as info:
        parse_event(payload)
    return info.value.reason


def test_call_start_parses_with_all_fields() -> None:
    ev = Wire().event(
        "call_start", 1.5, call_id="abc@host", aor="sip:Bob@Example.COM", from_user="alice", from_name="Alice A"
    )
    assert isinstance(ev, CallStarted)
    assert (ev.node, ev.ts, ev.seq, ev.boot) == ("kam1", 1.5, 1, 1700000000)
    assert ev.aor == "Bob@example.com"
    assert ev.from_name == "Alice A"
    assert ev.from_domain is None


def test_register_parses_push_parameters() -> None:
    ev = Wire().register(
        10.0, pn_provider="apns.dev", pn_prid="ABC:voip", pn_param="TEAM.org.linphone.phone.voip", instance=None
    )
    assert isinstance(ev, Register)
    assert ev.pn_provider == "apns.dev"
    assert ev.instance is None
    assert ev.src_port == 50000


def test_kamailio_strings_for_numbers_and_null_are_accepted() -> None:
    w = Wire()
    payload = w.obj("register", 1.0, aor="bob@x", contact="sip:bob@h", src_ip="127.0.0.1", src_port="5060")
    payload.update(ts="1700000001.250000", seq="7", proto="UDP", expires="60", user_agent="<null>", instance="")
    ev = parse_event(json.dumps(payload)).event
    assert isinstance(ev, Register)
    assert (ev.ts, ev.seq, ev.src_port, ev.expires, ev.proto) == (1700000001.25, 7, 5060, 60, "udp")
    assert ev.user_agent is None and ev.instance is None


def test_failed_code_and_command_result() -> None:
    w = Wire()
    ev = w.failed(3.0, 603)
    assert isinstance(ev, CallFailed) and ev.code == 603
    res = w.event("cmd_result", 4.0, id="a-1", ok=True)
    assert isinstance(res, CommandResult) and res.ok and res.error is None
    assert event_type(res) == "cmd_result"


def test_unknown_fields_are_reported_not_fatal() -> None:
    parsed = parse_event(Wire().raw("call_answered", 1.0, call_id="c", extra=1, more="x"))
    assert parsed.unknown_fields == ("extra", "more")


def test_unknown_event_type_is_its_own_error() -> None:
    with pytest.raises(UnknownEventError):
        parse_event(Wire().raw("call_transferred", 1.0, call_id="c"))


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", "invalid_json"),
        (b"\xff\xfe", "invalid_json"),
        (b"[1,2]", "not_object"),
        (b'"text"', "not_object"),
        (b"{}", "missing_field"),
        (b'{"event": 5}', "missing_field"),
        (b"[" * 100000 + b"]" * 100000, "not_object"),
        (b'{"event":"call_start","unknown":Infinity}', "invalid_json"),
        (b'{"a":' * 5000 + b"1" + b"}" * 5000, "invalid_json"),
    ],
)
def test_malformed_payloads(payload: bytes, reason: str) -> None:
    assert reason_of(payload) == reason


def mutated(**changes: Any) -> bytes:
    obj = Wire().obj("call_start", 1.0, call_id="c@h", aor="bob@x", from_user="alice")
    obj.update(changes)
    return json.dumps({k: v for k, v in obj.items() if v is not ...}).encode()


@pytest.mark.parametrize(
    ("changes", "reason", "field"),
    [
        ({"call_id": ...}, "missing_field", "call_id"),
        ({"call_id": "<null>"}, "missing_field", "call_id"),
        ({"call_id": 42}, "bad_type", "call_id"),
        ({"call_id": "a\r\nVia: evil"}, "bad_value", "call_id"),
        ({"call_id": "a b"}, "bad_value", "call_id"),
        ({"call_id": "x" * 300}, "bad_value", "call_id"),
        ({"ts": "soon"}, "bad_type", "ts"),
        ({"ts": -1}, "bad_value", "ts"),
        ({"seq": 1.5}, "bad_type", "seq"),
        ({"seq": True}, "bad_type", "seq"),
        ({"seq": [1]}, "bad_type", "seq"),
        ({"node": ...}, "missing_field", "node"),
        ({"from_name": 3}, "bad_type", "from_name"),
        ({"v": 2}, "bad_version", "version"),
    ],
)
def test_bad_fields_name_the_field(changes: dict[str, Any], reason: str, field: str) -> None:
    with pytest.raises(EventError) as info:
        parse_event(mutated(**changes))
    assert info.value.reason == reason
    assert field in info.value.detail


def test_failed_code_out_of_range() -> None:
    with pytest.raises(EventError, match="code"):
        parse_event(Wire().raw("call_failed", 1.0, call_id="c", code=200))


def test_nan_timestamps_are_rejected() -> None:
    assert reason_of(b'{"event":"call_answered","node":"n","ts":NaN,"seq":1,"call_id":"c"}') == "invalid_json"
    assert reason_of(b'{"event":"call_answered","node":"n","ts":"nan","seq":1,"call_id":"c"}') == "bad_value"
    assert reason_of(b'{"event":"call_answered","node":"n","ts":"inf","seq":1,"call_id":"c"}') == "bad_value"


def test_normalize_aor() -> None:
    assert normalize_aor("sip:bob@EXAMPLE.com") == "bob@example.com"
    assert normalize_aor("SIPS:Bob@Example.com") == "Bob@example.com"
    assert normalize_aor("bob") == "bob"
    # No port, no URI parameters: REGISTERs and calls name one account alike.
    assert normalize_aor("sip:bob@Voip.Example.org:5060;transport=tls") == "bob@voip.example.org"
    assert normalize_aor("bob@voip.example.org:5061") == "bob@voip.example.org"
    assert normalize_aor("sip:bob@[2001:DB8::1]:5060") == "bob@[2001:db8::1]"


json_values = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.sampled_from(["", "<null>", "1", "1.5", "sip:a@b", "LinphoneiOS", "c@h"])
    | st.lists(st.integers(), max_size=2)
)


@given(
    st.sampled_from(["call_start", "call_answered", "call_cancelled", "call_failed", "register", "cmd_result", "x"]),
    st.dictionaries(
        st.sampled_from(
            [
                "node",
                "ts",
                "seq",
                "boot",
                "call_id",
                "aor",
                "from_user",
                "code",
                "contact",
                "src_ip",
                "src_port",
                "proto",
                "expires",
                "id",
                "ok",
                "user_agent",
                "instance",
            ]
        ),
        json_values,
    ),
)
def test_any_json_object_parses_or_raises_event_error(etype: str, fields: dict[str, Any]) -> None:
    with contextlib.suppress(EventError):
        parse_event(json.dumps({"event": etype, **fields}))


@given(st.binary(max_size=200))
def test_any_bytes_parse_or_raise_event_error(data: bytes) -> None:
    with contextlib.suppress(EventError):
        parse_event(data)


def test_branch_reply_names_the_call_the_code_and_the_contact() -> None:
    raw = b'{"event":"branch_reply","node":"k","ts":"1.5","seq":"3","call_id":"c1@x","code":"180",'
    raw += b'"contact":"sip:dev@192.0.2.4:5060;pn-prid=AB"}'
    parsed = parse_event(raw)
    event = parsed.event
    assert isinstance(event, BranchReply) and parsed.unknown_fields == ()
    assert (event.call_id, event.code, event.contact) == ("c1@x", 180, "sip:dev@192.0.2.4:5060;pn-prid=AB")
    with pytest.raises(EventError) as err:
        parse_event(raw.replace(b'"180"', b'"99"'))
    assert err.value.reason == "bad_value"


def test_call_start_says_whether_the_call_waits_for_a_push() -> None:
    base = b'{"event":"call_start","node":"k","ts":1,"seq":1,"call_id":"c@x","aor":"bob@example.com","from_user":"a"'
    assert parse_event(base + b"}").event == parse_event(base + b',"push":false}').event
    held = parse_event(base + b',"push":true}').event
    assert isinstance(held, CallStarted) and held.push


@pytest.mark.parametrize(
    "payload",
    [
        b'{"event":"register","aor":"\xff\xfe"}',
        b'{"event":"call_start","node":"k","ts":1,"seq":1,"call_id":"c@x","aor":"b@x","from_user":"\xc3"}',
        b"\xff\xfe\xfd",
        b'{"event":"call_start","extra":"\xff","node":"k","ts":1,"seq":1}',
    ],
)
def test_bytes_that_are_not_utf8_are_a_counted_bad_frame_never_a_crash(payload: bytes) -> None:
    with pytest.raises(EventError) as err:
        parse_event(payload)
    assert err.value.reason in ("invalid_json", "missing_field", "bad_type", "bad_value")
    with pytest.raises(EventError):
        decode_event(payload)


@pytest.mark.parametrize(
    ("field", "limit"),
    [("from_name", 256), ("aor", 256), ("from_user", 256), ("node", 64)],
)
def test_over_long_values_are_refused_so_memory_per_call_is_bounded(field: str, limit: int) -> None:
    event = {"event": "call_start", "node": "k", "ts": 1, "seq": 1, "call_id": "c@x", "aor": "b@x", "from_user": "a"}
    assert parse_event(json.dumps({**event, field: "x" * limit}).encode())
    with pytest.raises(EventError) as err:
        parse_event(json.dumps({**event, field: "x" * 15_000}).encode())
    assert err.value.reason == "bad_value"


def test_over_long_register_fields_are_refused() -> None:
    w = Wire()
    with pytest.raises(EventError):
        w.register(1.0, user_agent="LinphoneiOS " + "x" * 300)
    with pytest.raises(EventError):
        w.register(1.0, contact="sip:bob@192.0.2.1;" + "p" * 600)


def test_refused_request_and_lost_ends_parse() -> None:
    w = Wire()
    refused = w.event("refused", 1.0, reason="call_id_nul", src_ip="192.0.2.7")
    assert isinstance(refused, Refused) and (refused.reason, refused.src_ip) == ("call_id_nul", "192.0.2.7")
    cancelled = w.cancelled(2.0)
    assert isinstance(cancelled, CallCancelled) and cancelled.lost is False
    lost = w.event("call_failed", 3.0, call_id="c", code=486, lost=True)
    assert isinstance(lost, CallFailed) and lost.lost
    with pytest.raises(EventError):
        parse_event(w.raw("refused", 4.0, reason=""))
