"""What may reach a SIP header or a SIPp twin message."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from evapi_worker.core import sip_values as sv
from evapi_worker.core.sip_values import UnsafeValue
from evapi_worker.core.sipp_twin import call_message


def test_a_call_id_passes_unchanged() -> None:
    assert sv.call_id("abc%41@host") == "abc%41@host"


@pytest.mark.parametrize("bad", ["", "a b", "a\r\nVia: x", "a;b", "x" * 300, "a@b@c", "é"])
def test_bad_call_ids(bad: str) -> None:
    with pytest.raises(UnsafeValue, match="call_id"):
        sv.call_id(bad)


def test_user_part_encoding_keeps_meaning() -> None:
    assert sv.sip_user("u", "alice") == "alice"
    assert sv.sip_user("u", "+4930123") == "+4930123"
    assert sv.sip_user("u", "a;b") == "a%3Bb"
    assert sv.sip_user("u", "a%3Bb") == "a%3Bb"
    assert sv.sip_user("u", "#1 <x>") == "%231%20%3Cx%3E"
    assert sv.sip_user("u", "jörg") == "j%C3%B6rg"


@pytest.mark.parametrize("bad", ["", "a\nb", "a\rb", "nul\x00", "x" * 300])
def test_user_part_rejects_control_characters(bad: str) -> None:
    with pytest.raises(UnsafeValue):
        sv.sip_user("from_user", bad)


def test_hosts() -> None:
    assert sv.sip_host("h", "example.com") == "example.com"
    assert sv.sip_host("h", "192.0.2.1") == "192.0.2.1"
    assert sv.sip_host("h", "[2001:db8::1]") == "[2001:db8::1]"
    for bad in ["exa mple.com", "a;b", "-bad.com", "x\r\n", "[zz]", "a_b.com"]:
        with pytest.raises(UnsafeValue):
            sv.sip_host("h", bad)


def _valid_quoted_string(text: str) -> bool:
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return False
    inner, i = text[1:-1], 0
    while i < len(inner):
        if inner[i] == "\\":
            if i + 1 >= len(inner):
                return False
            i += 2
        elif inner[i] == '"':
            return False
        else:
            i += 1
    return True


def test_display_name_keeps_quoted_pairs_from_kamailio() -> None:
    # $fn gives the quoted-string's content, escapes and all.
    assert sv.display_name('Alice \\"The Boss\\" O\\\\Hara') == '"Alice \\"The Boss\\" O\\\\Hara" '
    assert sv.display_name("trailing\\") == '"trailing\\\\" '


def test_display_name_is_quoted_and_escaped() -> None:
    assert sv.display_name("Alice") == '"Alice" '
    assert sv.display_name('Al "the" one') == '"Al \\"the\\" one" '
    assert sv.display_name("Smith; John") == '"Smith; John" '
    with pytest.raises(UnsafeValue, match="control"):
        sv.display_name("Alice\r\nX-Evil: 1")


def test_tokens_and_uris() -> None:
    assert sv.token("pin", "Ab-9_x") == "Ab-9_x"
    for bad in ["", "a b", "a;b", "a\n"]:
        with pytest.raises(UnsafeValue):
            sv.token("pin", bad)
    assert sv.sip_uri("contact", "sip:bob@10.0.0.1:5060;transport=tcp") == "sip:bob@10.0.0.1:5060;transport=tcp"
    quoted = 'sip:a@b;pn-prid="ab:cd"'  # as apps send it and the registrar keeps it
    assert sv.sip_uri("contact", quoted) == quoted
    for bad in ["http://x", "sip:a b", "sip:a\r\n", "sip:a\x00", "sip:<a>"]:
        with pytest.raises(UnsafeValue):
            sv.sip_uri("contact", bad)


@given(st.text(max_size=80))
def test_any_text_is_either_refused_or_made_header_and_twin_safe(text: str) -> None:
    for fn in (lambda v: sv.sip_user("u", v), sv.display_name, lambda v: sv.sip_host("h", v)):
        try:
            out = fn(text)
        except UnsafeValue:
            continue
        assert not any(ch in out for ch in "\r\n\x00\x1b")
        if out.startswith('"'):
            assert _valid_quoted_string(out.rstrip(" "))
            call_message("c@h", "1", ("a",) * 6, out)  # the display name: spaces allowed
        else:
            assert ";" not in out
            call_message("c@h", "1", (out,) * 6, "")  # a field: no space, no control character
