"""Events from Kamailio: a closed set of frozen dataclasses and their parser.

Protocol v1 is described in docs/protocol.md. Every event is one JSON object
with an ``event`` name, the emitting ``node``, Kamailio's own wall-clock
timestamp ``ts`` (``$TV(Sn)``), a per-node sequence number ``seq`` and the
node's start time ``boot`` (``$Tb``), so the worker can order events by when
Kamailio saw them and notice lost ones.

Bad input is the remote side's fault: :func:`parse_event` raises
:class:`EventError` with a short ``reason`` code (for metrics) and a sentence
naming the field (for logs). Unknown fields are not errors; they are returned
so the caller can count them.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final, TypeAlias

__all__ = [
    "CallAnswered",
    "CallCancelled",
    "CallEnded",
    "CallFailed",
    "CallStarted",
    "CommandResult",
    "Event",
    "EventError",
    "Parsed",
    "Register",
    "UnknownEventError",
    "normalize_aor",
    "parse_event",
]

PROTOCOL_VERSION: Final = 1

# RFC 3261 callid = word [ "@" word ]; word characters as in section 25.1.
_CALL_ID_RE: Final = re.compile(r"[A-Za-z0-9\-.!%*_+`'~()<>:\\\"/\[\]?{}]+(@[A-Za-z0-9\-.!%*_+`'~()<>:\\\"/\[\]?{}]+)?")
_MAX_CALL_ID: Final = 256
# Kamailio prints an unset pseudo-variable as "<null>" when it builds strings.
_NULLS: Final = frozenset(("", "<null>"))


def _is_null(value: object) -> bool:
    return value is None or (isinstance(value, str) and value in _NULLS)


@dataclass(frozen=True, slots=True)
class _Header:
    node: str
    ts: float
    seq: int
    boot: int


@dataclass(frozen=True, slots=True)
class CallStarted:
    """An INVITE for a user was accepted for ringing (a push was sent)."""

    node: str
    ts: float
    seq: int
    boot: int
    call_id: str
    aor: str
    from_user: str
    from_name: str | None = None
    from_domain: str | None = None


@dataclass(frozen=True, slots=True)
class CallAnswered:
    """A 2xx final response to the call's INVITE (answered by some device)."""

    node: str
    ts: float
    seq: int
    boot: int
    call_id: str


@dataclass(frozen=True, slots=True)
class CallCancelled:
    """The caller sent CANCEL before any answer."""

    node: str
    ts: float
    seq: int
    boot: int
    call_id: str


@dataclass(frozen=True, slots=True)
class CallFailed:
    """A final failure response (3xx-6xx) ended the call; 6xx means declined."""

    node: str
    ts: float
    seq: int
    boot: int
    call_id: str
    code: int


@dataclass(frozen=True, slots=True)
class Register:
    """A successful REGISTER (after ``save("location")``) of one contact."""

    node: str
    ts: float
    seq: int
    boot: int
    aor: str
    contact: str
    src_ip: str
    src_port: int
    proto: str
    expires: int
    user_agent: str | None = None
    instance: str | None = None
    pn_provider: str | None = None
    pn_prid: str | None = None
    pn_param: str | None = None


@dataclass(frozen=True, slots=True)
class CommandResult:
    """Kamailio's acknowledgement of one worker command."""

    node: str
    ts: float
    seq: int
    boot: int
    id: str
    ok: bool
    error: str | None = None


CallEnded: TypeAlias = CallAnswered | CallCancelled | CallFailed
Event: TypeAlias = CallStarted | CallAnswered | CallCancelled | CallFailed | Register | CommandResult


class EventError(Exception):
    """A frame that is not a valid v1 event. ``reason`` is a metric label."""

    def __init__(self, reason: str, detail: str, event_type: str | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.event_type = event_type


class UnknownEventError(EventError):
    """A well-formed event of a type this version does not know (skipped)."""


@dataclass(frozen=True, slots=True)
class Parsed:
    """A parsed event and the names of fields this version does not know."""

    event: Event
    unknown_fields: tuple[str, ...] = ()


def normalize_aor(value: str) -> str:
    """``sip:Bob@Example.COM`` -> ``bob@example.com``-style key for matching.

    The user part keeps its case except for the scheme; the domain is
    case-insensitive in SIP, so it is lowered.
    """
    aor = value.strip()
    lowered = aor[:5].lower()
    if lowered.startswith("sips:"):
        aor = aor[5:]
    elif lowered.startswith("sip:"):
        aor = aor[4:]
    user, at, domain = aor.rpartition("@")
    if not at:
        return aor
    return f"{user}@{domain.lower()}"


class _Fields:
    """Typed access to one event's JSON object; errors name the field."""

    __slots__ = ("etype", "obj")

    def __init__(self, obj: Mapping[str, object], etype: str) -> None:
        self.obj = obj
        self.etype = etype

    def _err(self, reason: str, detail: str) -> EventError:
        return EventError(reason, f"{self.etype}: {detail}", self.etype)

    def text(self, name: str) -> str:
        value = self.obj.get(name)
        if _is_null(value):
            raise self._err("missing_field", f"field {name!r} is missing or empty")
        if not isinstance(value, str):
            raise self._err("bad_type", f"field {name!r} must be a string, not {type(value).__name__}")
        return value

    def opt_text(self, name: str) -> str | None:
        value = self.obj.get(name)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self._err("bad_type", f"field {name!r} must be a string, not {type(value).__name__}")
        return None if value in _NULLS else value

    def integer(self, name: str, low: int, high: int) -> int:
        value = self.obj.get(name)
        if _is_null(value):
            raise self._err("missing_field", f"field {name!r} is missing or empty")
        if isinstance(value, str) and value.isdigit() and value.isascii():
            # Kamailio's $var() numbers often arrive as strings.
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._err("bad_type", f"field {name!r} must be an integer")
        if not low <= value <= high:
            raise self._err("bad_value", f"field {name!r}={value} is outside {low}..{high}")
        return value

    def opt_integer(self, name: str, low: int, high: int, default: int) -> int:
        if _is_null(self.obj.get(name)):
            return default
        return self.integer(name, low, high)

    def time(self, name: str) -> float:
        value = self.obj.get(name)
        if _is_null(value):
            raise self._err("missing_field", f"field {name!r} is missing or empty")
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise self._err("bad_type", f"field {name!r} is not a number") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._err("bad_type", f"field {name!r} must be a number")
        number = float(value)
        if not math.isfinite(number) or number < 0:
            raise self._err("bad_value", f"field {name!r}={value!r} is not a time")
        return number

    def flag(self, name: str) -> bool:
        value = self.obj.get(name)
        if isinstance(value, bool):
            return value
        if value in (0, 1, "0", "1", "true", "false"):
            return value in (1, "1", "true")
        raise self._err("bad_type", f"field {name!r} must be true or false")

    def call_id(self) -> str:
        value = self.text("call_id")
        if len(value) > _MAX_CALL_ID:
            raise self._err("bad_value", f"field 'call_id' is longer than {_MAX_CALL_ID} characters")
        if _CALL_ID_RE.fullmatch(value) is None:
            raise self._err("bad_value", "field 'call_id' has characters a SIP Call-ID may not contain")
        return value

    def header(self) -> _Header:
        return _Header(
            node=self.text("node"),
            ts=self.time("ts"),
            seq=self.integer("seq", 0, 2**63 - 1),
            boot=self.opt_integer("boot", 0, 2**63 - 1, 0),
        )


def _call_started(f: _Fields, h: _Header) -> CallStarted:
    return CallStarted(
        h.node,
        h.ts,
        h.seq,
        h.boot,
        call_id=f.call_id(),
        aor=normalize_aor(f.text("aor")),
        from_user=f.text("from_user"),
        from_name=f.opt_text("from_name"),
        from_domain=f.opt_text("from_domain"),
    )


def _call_answered(f: _Fields, h: _Header) -> CallAnswered:
    return CallAnswered(h.node, h.ts, h.seq, h.boot, call_id=f.call_id())


def _call_cancelled(f: _Fields, h: _Header) -> CallCancelled:
    return CallCancelled(h.node, h.ts, h.seq, h.boot, call_id=f.call_id())


def _call_failed(f: _Fields, h: _Header) -> CallFailed:
    return CallFailed(h.node, h.ts, h.seq, h.boot, call_id=f.call_id(), code=f.integer("code", 300, 699))


def _register(f: _Fields, h: _Header) -> Register:
    proto = f.text("proto").lower()
    return Register(
        h.node,
        h.ts,
        h.seq,
        h.boot,
        aor=normalize_aor(f.text("aor")),
        contact=f.text("contact"),
        src_ip=f.text("src_ip"),
        src_port=f.integer("src_port", 1, 65535),
        proto=proto,
        expires=f.integer("expires", 0, 2**31 - 1),
        user_agent=f.opt_text("user_agent"),
        instance=f.opt_text("instance"),
        pn_provider=f.opt_text("pn_provider"),
        pn_prid=f.opt_text("pn_prid"),
        pn_param=f.opt_text("pn_param"),
    )


def _command_result(f: _Fields, h: _Header) -> CommandResult:
    return CommandResult(h.node, h.ts, h.seq, h.boot, id=f.text("id"), ok=f.flag("ok"), error=f.opt_text("error"))


_COMMON: Final = frozenset(("event", "v", "node", "ts", "seq", "boot"))
_PARSERS: Final[dict[str, tuple[Callable[[_Fields, _Header], Event], frozenset[str]]]] = {
    "call_start": (_call_started, _COMMON | {"call_id", "aor", "from_user", "from_name", "from_domain"}),
    "call_answered": (_call_answered, _COMMON | {"call_id"}),
    "call_cancelled": (_call_cancelled, _COMMON | {"call_id"}),
    "call_failed": (_call_failed, _COMMON | {"call_id", "code"}),
    "register": (
        _register,
        _COMMON
        | {
            "aor",
            "contact",
            "src_ip",
            "src_port",
            "proto",
            "expires",
            "user_agent",
            "instance",
            "pn_provider",
            "pn_prid",
            "pn_param",
        },
    ),
    "cmd_result": (_command_result, _COMMON | {"id", "ok", "error"}),
}

EVENT_TYPES: Final = tuple(_PARSERS)


def parse_event(payload: bytes | str) -> Parsed:
    """Parse one frame's payload into a typed event.

    Raises :class:`UnknownEventError` for a valid object of an unknown type
    and :class:`EventError` for anything else that is not a v1 event.
    """
    try:
        obj = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EventError("invalid_json", f"payload is not JSON: {exc}") from None
    except RecursionError:
        raise EventError("invalid_json", "payload nests too deeply") from None
    if not isinstance(obj, dict):
        raise EventError("not_object", f"payload is a JSON {type(obj).__name__}, not an object")
    etype = obj.get("event")
    if not isinstance(etype, str) or not etype:
        raise EventError("missing_field", "field 'event' is missing or not a string")
    version = obj.get("v", PROTOCOL_VERSION)
    if version != PROTOCOL_VERSION and version != str(PROTOCOL_VERSION):
        raise EventError("bad_version", f"{etype}: protocol version {version!r} is not {PROTOCOL_VERSION}", etype)
    entry = _PARSERS.get(etype)
    if entry is None:
        raise UnknownEventError("unknown_type", f"event type {etype[:40]!r} is not known", None)
    parser, known = entry
    fields = _Fields(obj, etype)
    event = parser(fields, fields.header())
    extra = obj.keys() - known
    return Parsed(event, tuple(sorted(extra)) if extra else ())


def event_type(event: Event) -> str:
    """The wire name of an event's type (for metrics and logs)."""
    return _TYPE_NAMES[type(event)]


_TYPE_NAMES: Final[dict[type, str]] = {
    CallStarted: "call_start",
    CallAnswered: "call_answered",
    CallCancelled: "call_cancelled",
    CallFailed: "call_failed",
    Register: "register",
    CommandResult: "cmd_result",
}
