"""Commands from the worker to Kamailio: frozen, keyword-only structs
encoded by msgspec.

Each command carries an ``id`` that Kamailio echoes in a ``cmd_result``
event. Commands are encoded to one netstring and must be written in one
write: Kamailio's evapi reader silently drops a frame split before its
trailing comma, and closes the connection on a frame over 32,760 bytes.
"""

from __future__ import annotations

from typing import Final, TypeAlias

import msgspec

from .netstring import encode

__all__ = [
    "COMMAND_NAMES",
    "MAX_COMMAND_BYTES",
    "Claim",
    "Command",
    "CommandTooLarge",
    "Hello",
    "Message",
    "Pin",
    "Ping",
    "command_name",
    "encode_command",
]

# Well under evapi's 32,760-byte receive buffer, so a command is never cut.
MAX_COMMAND_BYTES: Final = 8192


class _Command(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag_field="cmd"):
    # Assigned by the connection that sends it (EvapiConnection.send_command),
    # unique to this worker instance: an acknowledgement meant for an
    # earlier instance never matches.
    id: str = ""


class Hello(_Command, frozen=True, kw_only=True, tag="hello"):
    """A worker's first command on each connection: the node sends the
    events only to connections that said it (see docs/kamailio.md)."""


class Ping(_Command, frozen=True, kw_only=True, tag="ping"):
    """Liveness check; Kamailio answers ``ok``."""


class Pin(_Command, frozen=True, kw_only=True, tag="pin"):
    """Claim a fake call and, if this worker wins, pin where the device is.

    ``claim`` names the (call, device) pair: the first worker to claim it on
    this node wins (``cmd_result`` says ``claim: won``); the others are told
    ``taken`` and send nothing. The node handles every worker's commands one
    at a time in its evapi dispatcher, so the check-and-set is atomic there.
    A claim lives ``claim_ttl`` seconds. ``retry`` (1): this worker restarted
    after a crash and may have pinned this call before; if that pin is
    still unused (its INVITE never came), the node hands the claim over
    (``won``) and removes the old pin, else the claim stays ``taken``.

    The fake INVITE carries ``key`` in an ``X-Evapi-Pin`` header; Kamailio
    sends it to ``ruri``, which must be a registered contact of ``aor``,
    where that registration came from (``dst`` is only checked to be there:
    a command cannot choose the address). The entry lives for ``ttl``
    seconds.
    """

    key: str
    ruri: str
    dst: str
    ttl: int
    aor: str = ""
    claim: str = ""
    claim_ttl: int = 0
    retry: int = 0


class Message(_Command, frozen=True, kw_only=True, tag="message"):
    """Ask Kamailio to send a SIP MESSAGE telling a device a call is over;
    ``ruri`` must be a registered contact of ``to_uri``'s account."""

    ruri: str
    dst: str
    from_uri: str
    to_uri: str
    body: str
    claim: str = ""  # as for Pin: only the winner's MESSAGE is sent
    claim_ttl: int = 0


class Claim(_Command, frozen=True, kw_only=True, tag="claim"):
    """Claim a push (or any other one-worker task) on this node: the first
    worker wins (``claim: won``), the others are told ``taken``."""

    claim: str
    claim_ttl: int


Command: TypeAlias = Hello | Ping | Pin | Message | Claim
COMMAND_NAMES: Final = tuple(str(kind.__struct_config__.tag) for kind in (Hello, Ping, Pin, Message, Claim))
"""Every command's wire name (a metric label)."""


class CommandTooLarge(ValueError):
    """A command would not fit in one evapi read on Kamailio's side."""


def command_name(command: Command) -> str:
    """The wire name of a command (also its metric label)."""
    tag = type(command).__struct_config__.tag
    assert isinstance(tag, str)
    return tag


_ENCODER: Final = msgspec.json.Encoder()


def encode_command(command: Command) -> bytes:
    """JSON in one netstring, ``cmd`` and ``id`` first, defaults left out."""
    payload = _ENCODER.encode(command)
    if len(payload) > MAX_COMMAND_BYTES:
        raise CommandTooLarge(f"{command_name(command)} command is {len(payload)} bytes, over {MAX_COMMAND_BYTES}")
    return encode(payload)
