"""Events from Kamailio: a closed set of frozen records and their parser.

Protocol v1 is described in docs/protocol.md. Every event is one JSON object
with an ``event`` name, the emitting ``node``, Kamailio's own wall-clock
timestamp ``ts`` (``$TV(Sn)``), a per-node sequence number ``seq`` and the
node's start time ``boot`` (``$Tb``), so the worker can order events by when
Kamailio saw them and notice lost ones.

The records are frozen ``msgspec.Struct`` s, decoded and validated straight
from the JSON bytes: at 100,000 events/s a hand-written validator over a
parsed dict took most of the worker's time (bench/ingest.py). They hold only
strings and numbers, so they are kept out of the cyclic garbage collector.

Bad input is the remote side's fault: :func:`parse_event` raises
:class:`EventError` with a short ``reason`` code (for metrics) and a sentence
naming the field (for logs). Unknown fields are not errors; they are returned
so the caller can count them.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Annotated, Final, TypeAlias

import msgspec
from msgspec import Meta, Struct
from msgspec.structs import force_setattr

from .msgspec_errors import read_problem
from .sip_values import CALL_ID_PATTERN

__all__ = [
    "EVENT_TYPES",
    "MAX_NAME",
    "MAX_SHORT",
    "MAX_URI",
    "TYPE_NAMES",
    "BranchReply",
    "CallAnswered",
    "CallCancelled",
    "CallEnded",
    "CallFailed",
    "CallStarted",
    "ClaimReply",
    "ClaimUnused",
    "CommandResult",
    "Event",
    "EventError",
    "EventErrorReason",
    "Parsed",
    "Refused",
    "RefusedReason",
    "Register",
    "UnknownEventError",
    "decode_event",
    "event_type",
    "normalize_aor",
    "parse_event",
    "peek_sequence",
]

PROTOCOL_VERSION: Final = 1

CallId = Annotated[str, Meta(pattern=f"^{CALL_ID_PATTERN}$", max_length=256)]
# Every string has a bound, so the memory a tracked call or device can take
# is known (a 15 KB display name under the frame limit would otherwise be
# kept as it is); longer values make the event invalid (bad_value).
MAX_SHORT: Final = 64
MAX_NAME: Final = 256
MAX_URI: Final = 512
Short = Annotated[str, Meta(max_length=MAX_SHORT)]
Name = Annotated[str, Meta(max_length=MAX_NAME)]
Uri = Annotated[str, Meta(max_length=MAX_URI)]
# Any later time is garbage, not a timestamp (year 5138).
Timestamp = Annotated[float, Meta(ge=0, le=1e11)]
Count = Annotated[int, Meta(ge=0)]
# Kamailio's counters are C ints: a node's sequence number goes from
# 2**31 - 1 to -2**31 (seen on Kamailio 5.6 after 2**31 events) and on.
# Anything outside a 32-bit int was never sent by a node.
SEQ_MIN: Final = -(2**31)
SEQ_MAX: Final = 2**31 - 1
Sequence = Annotated[int, Meta(ge=SEQ_MIN, le=SEQ_MAX)]
# Kamailio prints an unset pseudo-variable as "<null>" when it builds strings.
_NULLS: Final = frozenset(("", "<null>"))


def normalize_aor(value: str) -> str:
    """``sip:Bob@Example.COM:5060;transport=tls`` -> ``Bob@example.com``, the
    key calls and registrations are matched by: no scheme, no port, no URI
    parameters, the domain in lower case (it is case-insensitive in SIP; the
    user part is not). A key without ``@`` (Kamailio with ``use_domain`` off)
    is kept as it is."""
    if value == value.lower() and not value.startswith("sip") and value == value.strip() and ":" not in value:
        return value  # already a key: the usual "user@domain" from Kamailio
    aor = value.strip()
    lowered = aor[:5].lower()
    if lowered.startswith("sips:"):
        aor = aor[5:]
    elif lowered.startswith("sip:"):
        aor = aor[4:]
    user, at, domain = aor.rpartition("@")
    if not at:
        return aor
    domain = domain.split(";", 1)[0]
    # Without the port; an IPv6 reference keeps its brackets: [2001:db8::1]:5060
    end = domain.find("]") + 1 if domain.startswith("[") else 0
    domain = domain[:end] if end else domain.split(":", 1)[0]
    return f"{user}@{domain.lower()}"


class EventErrorReason(enum.StrEnum):
    """Why a frame is not an event (a metric label)."""

    INVALID_JSON = "invalid_json"  # not JSON, not UTF-8, nested too deeply
    NOT_OBJECT = "not_object"  # JSON, but not an object
    MISSING_FIELD = "missing_field"  # a required field is missing or empty
    BAD_TYPE = "bad_type"  # a field of the wrong JSON type
    BAD_VALUE = "bad_value"  # a field out of its range, pattern or length
    BAD_VERSION = "bad_version"  # another protocol version
    BAD_SEQUENCE = "bad_sequence"  # a sequence number the node cannot have reached
    UNKNOWN_TYPE = "unknown_type"  # an event type this version does not know (skipped)


class _Invalid(ValueError):
    """Raised from ``__post_init__``; msgspec wraps it in a ValidationError."""

    def __init__(self, reason: EventErrorReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")


def _required(event: Struct, *names: str) -> None:
    for name in names:
        if getattr(event, name) in _NULLS:
            raise _Invalid(EventErrorReason.MISSING_FIELD, f"field {name!r} is missing or empty")


def _optional(event: Struct, *names: str) -> None:
    for name in names:
        if getattr(event, name) in _NULLS:
            force_setattr(event, name, None)


class _Base(Struct, frozen=True, tag_field="event", forbid_unknown_fields=True, kw_only=True, gc=False):
    node: Short
    ts: Timestamp
    seq: Sequence
    boot: Count = 0
    v: int = PROTOCOL_VERSION

    def _check_header(self) -> None:
        if self.node in _NULLS:
            raise _Invalid(EventErrorReason.MISSING_FIELD, "field 'node' is missing or empty")
        if self.v != PROTOCOL_VERSION:
            raise _Invalid(EventErrorReason.BAD_VERSION, f"protocol version {self.v} is not {PROTOCOL_VERSION}")


class CallStarted(_Base, frozen=True, tag="call_start"):
    """An INVITE for a user was accepted for ringing (a push was sent)."""

    call_id: CallId
    aor: Name
    from_user: Name
    from_name: Name | None = None
    from_domain: Name | None = None
    push: bool = False  # held for a push: the account had no reachable contact
    domain: Name | None = None  # the called SIP domain, for an aor without one (use_domain 0)

    def __post_init__(self) -> None:
        # Checks written out, not looped over: this runs for every event.
        if self.node in _NULLS or self.v != PROTOCOL_VERSION:
            self._check_header()
        if self.call_id in _NULLS or self.aor in _NULLS or self.from_user in _NULLS:
            _required(self, "call_id", "aor", "from_user")
        if self.from_name in _NULLS or self.from_domain in _NULLS or self.domain in _NULLS:
            _optional(self, "from_name", "from_domain", "domain")
        aor = normalize_aor(self.aor)
        if aor is not self.aor:
            force_setattr(self, "aor", aor)


class _CallEvent(_Base, frozen=True):
    """An event about one call, named by its Call-ID and the account it
    calls: Call-IDs are chosen by callers, so one Call-ID can name calls to
    two accounts. ``aor`` is None only from routes older than it (the
    Call-ID alone then names the call)."""

    call_id: CallId
    aor: Name | None = None

    def __post_init__(self) -> None:
        if self.node in _NULLS or self.v != PROTOCOL_VERSION:
            self._check_header()
        if self.call_id in _NULLS:
            _required(self, "call_id")
        self._normalize_aor()

    def _normalize_aor(self) -> None:
        aor = self.aor
        if aor is None:
            return
        if aor in _NULLS:
            force_setattr(self, "aor", None)
            return
        key = normalize_aor(aor)
        if key is not aor:
            force_setattr(self, "aor", key)


class _EndEvent(_CallEvent, frozen=True):
    """How a call ended. ``lost``: the node had no transaction for it (it
    restarted during the call, or the message is forged), so only the
    Call-ID ties it to a call."""

    lost: bool = False


class CallAnswered(_EndEvent, frozen=True, tag="call_answered"):
    """A 2xx final response to the call's INVITE (answered by some device)."""


class CallCancelled(_EndEvent, frozen=True, tag="call_cancelled"):
    """The caller sent CANCEL before any answer."""


class CallFailed(_EndEvent, frozen=True, kw_only=True, tag="call_failed"):
    """A final failure response (3xx-6xx) ended the call; 6xx means declined."""

    code: Annotated[int, Meta(ge=300, le=699)]


class BranchReply(_CallEvent, frozen=True, kw_only=True, tag="branch_reply"):
    """A device answered something on its branch of the call's INVITE.

    ``contact`` is the branch's Request-URI, the device's registered Contact.
    A device that responded at all (rang, answered, declined) saw the call
    and gets no fake call for it.
    """

    code: Annotated[int, Meta(ge=100, le=699)]
    contact: Uri

    def __post_init__(self) -> None:
        if self.node in _NULLS or self.v != PROTOCOL_VERSION:
            self._check_header()
        if self.call_id in _NULLS or self.contact in _NULLS:
            _required(self, "call_id", "contact")
        self._normalize_aor()


class Register(_Base, frozen=True, tag="register"):
    """A successful REGISTER (after ``save("location")``) of one contact."""

    aor: Name
    contact: Uri
    src_ip: Short
    src_port: Annotated[int, Meta(ge=1, le=65535)]
    proto: Short
    expires: Annotated[int, Meta(ge=0, le=2**31 - 1)]
    user_agent: Name | None = None
    instance: Name | None = None
    pn_provider: Short | None = None
    pn_prid: Uri | None = None
    pn_param: Uri | None = None

    def __post_init__(self) -> None:
        if self.node in _NULLS or self.v != PROTOCOL_VERSION:
            self._check_header()
        if self.aor in _NULLS or self.contact in _NULLS or self.src_ip in _NULLS or self.proto in _NULLS:
            _required(self, "aor", "contact", "src_ip", "proto")
        if (
            self.user_agent in _NULLS
            or self.instance in _NULLS
            or self.pn_provider in _NULLS
            or self.pn_prid in _NULLS
            or self.pn_param in _NULLS
        ):
            _optional(self, "user_agent", "instance", "pn_provider", "pn_prid", "pn_param")
        aor = normalize_aor(self.aor)
        if aor is not self.aor:
            force_setattr(self, "aor", aor)
        if not self.proto.islower():
            force_setattr(self, "proto", self.proto.lower())


class ClaimReply(enum.StrEnum):
    """A node's answer to a command that claimed: the first worker to ask
    wins, every other is told it is taken."""

    WON = "won"
    TAKEN = "taken"


class CommandResult(_Base, frozen=True, tag="cmd_result"):
    """Kamailio's acknowledgement of one worker command."""

    id: Short
    ok: bool
    error: Name | None = None
    claim: ClaimReply | None = None  # for a command that claimed

    def __post_init__(self) -> None:
        if self.node in _NULLS or self.v != PROTOCOL_VERSION:
            self._check_header()
        if self.id in _NULLS:
            _required(self, "id")
        if self.error in _NULLS or self.claim in _NULLS:
            _optional(self, "error", "claim")


class ClaimUnused(_Base, frozen=True, tag="claim_unused"):
    """A won claim whose fake call never came: its worker died (or lost the
    node) between claiming and calling. That device got no fake call."""

    claim: Short

    def __post_init__(self) -> None:
        if self.node in _NULLS or self.v != PROTOCOL_VERSION:
            self._check_header()
        if self.claim in _NULLS:
            _required(self, "claim")


class RefusedReason(enum.StrEnum):
    """Why a node refused SIP data or held something back (a metric label:
    a reason the node sends that this version does not know is ``other``)."""

    CALL_ID_NUL = "call_id_nul"  # a Call-ID with a NUL byte
    FORGED_CALL_ENDED = "forged_call_ended"  # a call-ended MESSAGE from the network
    CONTACT_UNREADABLE = "contact_unreadable"  # a contact no event can carry intact
    TOO_MANY_CONTACTS = "too_many_contacts"  # an account past EVW_MAX_CONTACTS
    TOO_MANY_BRANCHES = "too_many_branches"  # a call given EVW_MAX_BRANCHES devices
    TOO_MANY_HELD = "too_many_held"  # an account with EVW_MAX_HELD_PER_ACCOUNT calls held
    WAKE_RATE = "wake_rate"  # an account's REGISTERs past EVW_WAKE_RATE a second
    PNS_NOT_SUPPORTED = "pns_not_supported"  # a REGISTER naming a push service not in EVW_PNS (555)
    OTHER = "other"  # a reason this version does not know


_REFUSED_REASONS: Final = frozenset(RefusedReason)


class Refused(_Base, frozen=True, tag="refused"):
    """SIP data Kamailio would not pass on (a Call-ID with a NUL byte, a
    forged call-ended MESSAGE, a contact an event cannot carry intact), or
    a bound it applied to one account; counted by ``reason``. ``aor`` is
    the account a bound was applied to."""

    reason: Short
    src_ip: Short | None = None
    aor: Name | None = None

    @property
    def label(self) -> RefusedReason:
        """The reason as a metric label: one this version knows, or ``other``."""
        return RefusedReason(self.reason) if self.reason in _REFUSED_REASONS else RefusedReason.OTHER

    def __post_init__(self) -> None:
        if self.node in _NULLS or self.v != PROTOCOL_VERSION:
            self._check_header()
        if self.reason in _NULLS:
            _required(self, "reason")
        if self.src_ip in _NULLS or self.aor in _NULLS:
            _optional(self, "src_ip", "aor")


CallEnded: TypeAlias = CallAnswered | CallCancelled | CallFailed
Event: TypeAlias = (
    CallStarted
    | CallAnswered
    | CallCancelled
    | CallFailed
    | BranchReply
    | Register
    | CommandResult
    | ClaimUnused
    | Refused
)

_CLASSES: Final[tuple[type[_Base], ...]] = (
    CallStarted,
    CallAnswered,
    CallCancelled,
    CallFailed,
    BranchReply,
    Register,
    CommandResult,
    ClaimUnused,
    Refused,
)
TYPE_NAMES: Final[Mapping[type, str]] = {cls: str(cls.__struct_config__.tag) for cls in _CLASSES}
"""Each event class's wire name (a metric label)."""
_KNOWN_FIELDS: Final[dict[str, frozenset[str]]] = {
    str(cls.__struct_config__.tag): frozenset(cls.__struct_fields__) | {"event"} for cls in _CLASSES
}
EVENT_TYPES: Final = tuple(TYPE_NAMES.values())
_DECODER: Final[msgspec.json.Decoder[Event]] = msgspec.json.Decoder(
    Event, strict=False
)  # strict=False: "7" is 7, as Kamailio sends it


class EventError(Exception):
    """A frame that is not a valid v1 event. ``reason`` is a metric label."""

    def __init__(self, reason: EventErrorReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class UnknownEventError(EventError):
    """A well-formed event of a type this version does not know (skipped)."""


class Parsed(Struct, frozen=True, gc=False):
    """A parsed event and the names of fields this version does not know.

    A Struct (one per event read): a NamedTuple took six times as long to make.
    """

    event: Event
    unknown_fields: tuple[str, ...] = ()


def parse_event(payload: bytes | str) -> Parsed:
    """Parse one frame's payload into a typed event.

    Raises :class:`UnknownEventError` for a valid object of an unknown type
    and :class:`EventError` for anything else that is not a v1 event.
    """
    try:
        return Parsed(_DECODER.decode(payload))
    except msgspec.ValidationError as exc:  # a subclass of DecodeError: first
        message = str(exc)
        if not message.startswith("Object contains unknown field"):
            raise _classify(message) from None
    except msgspec.DecodeError as exc:
        raise EventError(EventErrorReason.INVALID_JSON, f"payload is not JSON: {exc}") from None
    except UnicodeDecodeError:
        raise EventError(EventErrorReason.INVALID_JSON, "payload is not UTF-8") from None
    except RecursionError:
        raise EventError(EventErrorReason.INVALID_JSON, "payload nests too deeply") from None
    return _parse_with_unknown_fields(payload)


class _Sequence(Struct, gc=False):
    seq: int | None = None
    boot: int = 0
    ts: float = 0.0


_SEQUENCE: Final = msgspec.json.Decoder(_Sequence, strict=False)


def peek_sequence(payload: bytes) -> tuple[int, int, float] | None:
    """(boot, seq, ts) of a frame, read without validating the event (for
    frames shed under overload, so their numbers are not taken as lost)."""
    try:
        found = _SEQUENCE.decode(payload)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    seq = found.seq
    if seq is None or not SEQ_MIN <= seq <= SEQ_MAX:
        return None
    return found.boot, seq, found.ts


def decode_event(payload: bytes | str) -> Event:
    """Like :func:`parse_event`, for callers that do not count unknown fields."""
    try:
        event: Event = _DECODER.decode(payload)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return parse_event(payload).event  # the slow path names the problem
    return event


def _parse_with_unknown_fields(payload: bytes | str) -> Parsed:
    # The slow path, taken only when a newer Kamailio config sends fields
    # this version does not know: drop them, then validate the rest.
    try:
        obj = msgspec.json.decode(payload)
    except msgspec.DecodeError as exc:
        raise EventError(EventErrorReason.INVALID_JSON, f"payload is not JSON: {exc}") from None
    except UnicodeDecodeError:
        raise EventError(EventErrorReason.INVALID_JSON, "payload is not UTF-8") from None
    except RecursionError:
        raise EventError(EventErrorReason.INVALID_JSON, "payload nests too deeply") from None
    etype = obj.get("event") if isinstance(obj, dict) else None
    known = _KNOWN_FIELDS.get(etype) if isinstance(etype, str) else None
    if known is None:
        raise EventError(EventErrorReason.INVALID_JSON, "payload could not be read twice the same way")
    unknown = tuple(sorted(k for k in obj if k not in known))
    try:
        event = msgspec.convert({k: v for k, v in obj.items() if k in known}, Event, strict=False)
    except msgspec.ValidationError as exc:
        raise _classify(str(exc)) from None
    return Parsed(event, unknown)


def _classify(message: str) -> EventError:
    """Map msgspec's message to a reason code, keeping it as the detail."""
    found = read_problem(message)
    text = found.text
    if text.startswith(("missing_field: ", "bad_version: ")):  # raised by the events' own checks
        reason, _, detail = text.partition(": ")
        return EventError(EventErrorReason(reason), detail)
    if found.path == ["event"]:
        if text.startswith("Invalid value"):
            value = text.removeprefix("Invalid value ")
            return UnknownEventError(EventErrorReason.UNKNOWN_TYPE, f"event type {value[:40]} is not known")
        return EventError(EventErrorReason.MISSING_FIELD, "field 'event' is missing or not a string")
    if found.kind == "missing_field":
        return EventError(EventErrorReason.MISSING_FIELD, message)
    if text.startswith("Expected `object`") and not found.path:
        return EventError(EventErrorReason.NOT_OBJECT, f"payload is not a JSON object: {message}")
    if text.startswith("Expected") and ", got " in text:
        return EventError(EventErrorReason.BAD_TYPE, message)
    return EventError(EventErrorReason.BAD_VALUE, message)


def event_type(event: Event) -> str:
    """The wire name of an event's type (for metrics and logs)."""
    return TYPE_NAMES[type(event)]
