"""Commands from the worker to Kamailio, as frozen dataclasses.

Each command carries an ``id`` that Kamailio echoes in a ``cmd_result``
event. Commands are encoded to one netstring and must be written in one
write: Kamailio's evapi reader silently drops a frame split before its
trailing comma, and closes the connection on a frame over 32,760 bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Final, TypeAlias

from .netstring import encode

__all__ = ["MAX_COMMAND_BYTES", "Claim", "Command", "CommandTooLarge", "Message", "Pin", "Ping", "encode_command"]

# Well under evapi's 32,760-byte receive buffer, so a command is never cut.
MAX_COMMAND_BYTES: Final = 8192


@dataclass(frozen=True, slots=True)
class Ping:
    """Liveness check; Kamailio answers ``ok``."""

    id: str


@dataclass(frozen=True, slots=True)
class Pin:
    """Claim a fake call and, if this worker wins, pin where the device is.

    ``claim`` names the (call, device) pair: the first worker to claim it on
    this node wins (``cmd_result`` says ``claim: won``); the others are told
    ``taken`` and send nothing. The node handles every worker's commands one
    at a time in its evapi dispatcher, so the check-and-set is atomic there.
    A claim lives ``claim_ttl`` seconds. ``retry``: this worker restarted
    after a crash and may have pinned this call before; if that pin is
    still unused (its INVITE never came), the node hands the claim over
    (``won``) and removes the old pin, else the claim stays ``taken``.

    The fake INVITE carries ``key`` in an ``X-Evapi-Pin`` header; Kamailio
    sends it to ``ruri`` through ``dst`` (the address the REGISTER came from,
    so a TCP device is reached over its own connection). The entry lives for
    ``ttl`` seconds.
    """

    id: str
    key: str
    ruri: str
    dst: str
    ttl: int
    claim: str = ""
    claim_ttl: int = 0
    aor: str = ""  # the device's account: ruri must be one of its registered contacts
    retry: bool = False


@dataclass(frozen=True, slots=True)
class Message:
    """Ask Kamailio to send a SIP MESSAGE telling a device a call is over."""

    id: str
    ruri: str
    dst: str
    from_uri: str
    to_uri: str
    call_id: str
    body: str
    claim: str = ""  # as for Pin: only the winner's MESSAGE is sent
    claim_ttl: int = 0


@dataclass(frozen=True, slots=True)
class Claim:
    """Claim a push (or any other one-worker task) on this node: the first
    worker wins (``claim: won``), the others are told ``taken``."""

    id: str
    claim: str
    claim_ttl: int


Command: TypeAlias = Ping | Pin | Message | Claim


class CommandTooLarge(ValueError):
    """A command would not fit in one evapi read on Kamailio's side."""


def command_name(command: Command) -> str:
    """The wire name of a command (also its metric label)."""
    return _NAMES[type(command)]


_NAMES: Final[dict[type, str]] = {Ping: "ping", Pin: "pin", Message: "message", Claim: "claim"}


def encode_command(command: Command) -> bytes:
    """JSON in one netstring; field order is fixed so captures diff cleanly."""
    body: dict[str, object] = {"cmd": command_name(command)}
    if isinstance(command, Ping):
        body["id"] = command.id
    elif isinstance(command, Claim):
        body.update(id=command.id, claim=command.claim, claim_ttl=command.claim_ttl)
    elif isinstance(command, Pin):
        body.update(id=command.id, key=command.key, ruri=command.ruri, dst=command.dst, ttl=command.ttl)
        if command.aor:
            body["aor"] = command.aor
        if command.claim:
            body.update(claim=command.claim, claim_ttl=command.claim_ttl)
            if command.retry:
                body["retry"] = 1
    else:
        body.update(
            id=command.id,
            ruri=command.ruri,
            dst=command.dst,
            from_uri=command.from_uri,
            to_uri=command.to_uri,
            call_id=command.call_id,
            body=command.body,
        )
        if command.claim:
            body.update(claim=command.claim, claim_ttl=command.claim_ttl)
    payload = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    if len(payload) > MAX_COMMAND_BYTES:
        raise CommandTooLarge(f"{body['cmd']} command is {len(payload)} bytes, over {MAX_COMMAND_BYTES}")
    return encode(payload)
