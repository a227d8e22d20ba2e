"""Commands to Kamailio: what goes on the wire, and only what the routes read."""

from __future__ import annotations

import json

import pytest

from evapi_worker.core.commands import MAX_COMMAND_BYTES, Claim, CommandTooLarge, Message, Pin, Ping, encode_command


def wire(frame: bytes) -> dict[str, object]:
    length, _, rest = frame.partition(b":")
    assert rest.endswith(b",") and len(rest) - 1 == int(length)
    body: dict[str, object] = json.loads(rest[:-1])
    return body


def test_each_command_is_its_name_its_id_then_the_fields_set() -> None:
    pin = Pin(id="w-1", key="k" * 16, ruri="sip:d@192.0.2.1", dst="sip:192.0.2.1", ttl=30, aor="bob@example.com")
    assert list(wire(encode_command(pin))) == ["cmd", "id", "key", "ruri", "dst", "ttl", "aor"]
    claimed = Pin(id="w-2", key="k" * 16, ruri="r", dst="d", ttl=30, claim="c" * 32, claim_ttl=30, retry=1)
    assert wire(encode_command(claimed))["retry"] == 1 and wire(encode_command(claimed))["cmd"] == "pin"
    message = Message(id="w-3", ruri="r", dst="d", from_uri="sip:a@x", to_uri="sip:b@y", body="call-ended;x")
    assert list(wire(encode_command(message))) == ["cmd", "id", "ruri", "dst", "from_uri", "to_uri", "body"]
    assert wire(encode_command(Claim(id="w-4", claim="c", claim_ttl=5))) == {
        "cmd": "claim", "id": "w-4", "claim": "c", "claim_ttl": 5,
    }  # fmt: skip
    assert wire(encode_command(Ping(id="w-5"))) == {"cmd": "ping", "id": "w-5"}


def test_fields_are_named_never_positional() -> None:
    with pytest.raises(TypeError):
        Pin("k", "r", "d", 30)  # type: ignore[call-arg, arg-type]


def test_text_goes_out_as_json_escapes_it_and_a_command_too_large_is_refused() -> None:
    message = Message(id="w", ruri="r", dst="d", from_uri="f", to_uri="t", body='a "quoted"\r\nline é')
    assert wire(encode_command(message))["body"] == 'a "quoted"\r\nline é'
    with pytest.raises(CommandTooLarge, match="message command is"):
        encode_command(Message(id="w", ruri="r", dst="d", from_uri="f", to_uri="t", body="x" * MAX_COMMAND_BYTES))
