"""SIPp's twin-socket messages (3PCC), sans I/O.

A long-lived SIPp runs the fake-call scenario as a 3PCC "controller B": the
worker is its twin, connected over TCP. Each message is a few header lines
ended by an ESC byte (SIPp's delimiter). A message with a Call-ID SIPp does
not know starts a new call with that Call-ID: so each fake call carries the
original Call-ID although one process runs many calls.

    worker -> SIPp   Call-ID: <call id>
                     X-Evw-Call: <job> <callee user> <callee domain> <caller user> <caller domain> <pin> <reason> <name>
    SIPp -> worker   Call-ID: <call id>
                     X-Evw-Job: <job>
                     X-Evw-Outcome: <outcome>
    either way       Call-ID: <call id>
                     internal-cmd: abort_call

The fields of ``X-Evw-Call`` are separated by single spaces: every field
but the display name (last, may be empty) is a checked SIP token that
holds no space.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = ["ESC", "TwinError", "TwinReader", "TwinReply", "abort_message", "call_message", "parse_reply"]

ESC: Final = b"\x1b"
MAX_MESSAGE: Final = 16 * 1024  # SIPp's replies are a few lines


class TwinError(ValueError):
    """A message that cannot be sent, or a reply that cannot be read."""


@dataclass(frozen=True, slots=True)
class TwinReply:
    call_id: str
    job: str | None  # None: SIPp aborted the call itself
    outcome: str | None  # None when aborted


def _check(name: str, value: str, *, spaces: bool = False) -> str:
    for char in value:
        if char < " " or char == "\x7f" or (char == " " and not spaces):
            raise TwinError(f"{name} holds a character the twin message cannot carry")
    return value


def call_message(call_id: str, job: str, fields: tuple[str, ...], name: str) -> bytes:
    """The command that starts one fake call; ``fields`` are the seven
    tokens (callee user and domain, caller user and domain, pin, reason)
    between the job and the display name."""
    if not call_id:
        raise TwinError("empty Call-ID")
    words = [job, *fields]
    if any(not word for word in words):
        raise TwinError("an empty field")
    for word in words:
        _check("a field", word)
    line = " ".join(words) + " " + _check("the display name", name, spaces=True)
    return f"Call-ID: {_check('the Call-ID', call_id)}\r\nX-Evw-Call: {line}\r\n\r\n".encode() + ESC


def abort_message(call_id: str) -> bytes:
    """Ask SIPp to abort the call with ``call_id`` (past its time limit)."""
    return f"Call-ID: {_check('the Call-ID', call_id)}\r\ninternal-cmd: abort_call\r\n\r\n".encode() + ESC


def parse_reply(message: bytes) -> TwinReply:
    """One message from SIPp (without its ESC)."""
    headers: dict[str, str] = {}
    for line in message.decode("utf-8", errors="replace").splitlines():
        name, colon, value = line.partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    call_id = headers.get("call-id")
    if not call_id:
        raise TwinError(f"a reply without Call-ID: {message[:120]!r}")
    if headers.get("internal-cmd") == "abort_call":
        return TwinReply(call_id, None, None)
    job, outcome = headers.get("x-evw-job"), headers.get("x-evw-outcome")
    if not job or not outcome:
        raise TwinError(f"a reply without job or outcome: {message[:120]!r}")
    return TwinReply(call_id, job, outcome)


class TwinReader:
    """Splits the byte stream from SIPp into messages."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        messages = []
        while True:
            end = self._buffer.find(ESC)
            if end < 0:
                break
            messages.append(bytes(self._buffer[:end]))
            del self._buffer[: end + 1]
        if len(self._buffer) > MAX_MESSAGE:
            raise TwinError(f"a message longer than {MAX_MESSAGE} bytes")
        return messages
