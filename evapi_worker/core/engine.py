"""The late-registration engine: pure state, time passed in.

The engine answers one question: did a push device register after the call
it was woken for had already ended, soon enough that its CallKit screen is
still up? If so it decides a fake call (or a MESSAGE) for that device, once
per (call, device). "Soon enough" is the window from the call's start (or
end), or, for a device this worker pushed, from when that push can have
been delivered (:meth:`Engine.pushed`).

Two clocks are involved and never mixed:

* Kamailio's wall-clock timestamps (``event.ts``) order what happened:
  events from different SIP worker processes arrive out of order, so the
  engine compares timestamps, never arrival order.
* ``now``, the worker's monotonic clock passed in by the caller, drives
  expiry, the settle delay and fake-call deadlines. A REGISTER's deadline
  and settle delay count from when it happened, its timestamp on the same
  clock (``happened``, mapped by the caller, see protocol.py), not from when
  it was read: a worker that was frozen or behind never acts late.

Nothing here does I/O or reads a clock, so the same engine serves the live
service and replay under a virtual clock.
"""

from __future__ import annotations

import contextlib
import enum
import heapq
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Final, NamedTuple

import msgspec

from .devices import PushDetector, contact_keys, device_id, device_keys
from .events import (
    BranchReply,
    CallAnswered,
    CallCancelled,
    CallEnded,
    CallFailed,
    CallStarted,
    ClaimUnused,
    CommandResult,
    Event,
    Refused,
    Register,
)

__all__ = [
    "MAX_PUSHED",
    "MAX_RANG",
    "Act",
    "Action",
    "Anchor",
    "CallInfo",
    "CallRecord",
    "Decision",
    "DeviceRecord",
    "EndKind",
    "Engine",
    "EngineSettings",
    "EngineState",
    "Judged",
    "Reason",
    "Seconds",
    "Strategy",
    "remembered",
]


class Anchor(enum.Enum):
    """What the late window is measured from."""

    END = "end"  # the call's end (the behaviour this project started from)
    START = "start"  # the call's start, i.e. roughly when the push was sent


class Strategy(enum.Enum):
    """How a late device is told about the call it missed."""

    FAKE_CALL = "fake_call"  # INVITE with the original Call-ID, then CANCEL
    MESSAGE = "message"  # a SIP MESSAGE the app must understand


class EndKind(enum.Enum):
    """How a call ended, which picks the CANCEL's Reason."""

    ANSWERED = "answered"  # 2xx: answered elsewhere
    DECLINED = "declined"  # 6xx: declined elsewhere
    CANCELLED = "cancelled"  # caller hung up: a missed call
    FAILED = "failed"  # another final failure (timeout, busy...): missed

    @property
    def reason(self) -> Reason:
        """The reason of a decision to act: answered, declined or missed."""
        return _REASONS[self]


class Action(enum.Enum):
    FAKE_CALL = "fake_call"
    MESSAGE = "message"
    NONE = "none"


# Seconds: never negative, finite (TOML has inf and nan; no setting means them).
Seconds = Annotated[float, msgspec.Meta(ge=0, le=86_400)]


class EngineSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Engine tuning, and the ``[engine]`` table of the settings file (its
    constraints are checked when settings are loaded); docs/configuration.md
    says what each does."""

    window: Seconds = 15.0
    anchor: Anchor = Anchor.START
    strategy: Strategy = Strategy.FAKE_CALL
    settle: Seconds = 0.5
    deadline: Seconds = 5.0
    ring_timeout: Seconds = 180.0
    user_agents: tuple[Annotated[str, msgspec.Meta(min_length=1)], ...] = ("LinphoneiOS",)
    push_providers: tuple[Annotated[str, msgspec.Meta(min_length=1)], ...] = ("apns",)
    max_calls: Annotated[int, msgspec.Meta(ge=1)] = 100_000
    max_devices: Annotated[int, msgspec.Meta(ge=1)] = 100_000
    # One account's share of those: past it, that account's oldest goes.
    max_calls_per_account: Annotated[int, msgspec.Meta(ge=1)] = 128
    max_devices_per_account: Annotated[int, msgspec.Meta(ge=1)] = 256

    def __post_init__(self) -> None:
        # What a single field's constraint cannot say; the message starts
        # with the field's name.
        if self.settle > self.deadline:
            raise ValueError(f"settle: must not be longer than deadline ({self.deadline:g})")
        for pattern in self.user_agents:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"user_agents: {pattern!r} is not a regular expression: {exc}") from None


@dataclass(frozen=True, slots=True)
class CallInfo:
    """What a fake call needs to look like the original call."""

    call_id: str
    aor: str
    from_user: str
    from_name: str | None
    from_domain: str | None
    end: EndKind
    end_code: int | None
    domain: str | None = None  # the called SIP domain when the aor has none


class Reason(enum.StrEnum):
    """Why a decision is what it is: how the call ended, for an action, or
    why nothing is done."""

    ANSWERED = "answered"  # answered elsewhere
    DECLINED = "declined"  # declined elsewhere
    MISSED = "missed"  # cancelled by the caller, or another final failure
    RINGING = "ringing"  # still ringing: tsilo delivers the real INVITE
    RANG = "rang"  # the device responded to the real INVITE: it saw the call
    TOO_LATE = "too_late"  # outside the window: its call screen is gone
    DUPLICATE = "duplicate"  # it registered again after its fake call


_REASONS: Final = {
    EndKind.ANSWERED: Reason.ANSWERED,
    EndKind.DECLINED: Reason.DECLINED,
    EndKind.CANCELLED: Reason.MISSED,
    EndKind.FAILED: Reason.MISSED,
}


@dataclass(frozen=True, slots=True)
class Decision:
    """One decision about one (call, device) pair, logged and counted.

    A plain ``Decision`` does nothing (``action`` is ``NONE``); an
    :class:`Act` is one to carry out. Devices that are not push devices get
    no decision at all: their INVITEs reach them.
    """

    ts: float  # Kamailio time of the REGISTER
    node: str  # node the device registered on (the fake call goes there)
    call_id: str
    aor: str  # the account called: with the Call-ID, it names the call
    device: str
    action: Action
    reason: Reason
    since_start: float  # seconds from call start to REGISTER (push wake-up delay)
    since_end: float | None  # seconds from call end to REGISTER, None while ringing
    end: EndKind | None  # how the call ended, if it had when the device registered


@dataclass(frozen=True, slots=True)
class Act(Decision):
    """A decision to act: a fake call or a MESSAGE to the device."""

    call: CallInfo
    register: Register
    deadline: float  # monotonic time after which the action is useless


class CallRecord(msgspec.Struct, frozen=True):
    """One tracked call, as exported and imported (see state.py). Times
    ending in ``_at`` are on the engine's clock."""

    call_id: str
    aor: str
    started: CallStarted | None
    end_ts: float | None
    end: EndKind | None
    end_code: int | None
    expires_at: float
    decided: dict[str, bool]  # device -> whether it was given an action
    rang: list[str]
    # device -> the last moment its REGISTER is still an answer to the push
    # this worker sent it for the call (engine clock)
    pushed: dict[str, float] = {}


class DeviceRecord(msgspec.Struct, frozen=True):
    """One push device registered lately, as exported and imported."""

    register: Register
    device: str
    arrived_at: float
    expires_at: float
    pending: list[str]  # calls waiting for the settle delay


class EngineState(msgspec.Struct, frozen=True):
    """Everything the engine knows, in records."""

    calls: list[CallRecord]
    devices: list[DeviceRecord]

    def shifted(self, offset: float) -> EngineState:
        """The same state with every engine time moved by ``offset``."""
        return EngineState(
            [
                msgspec.structs.replace(
                    c, expires_at=c.expires_at + offset, pushed={d: t + offset for d, t in c.pushed.items()}
                )
                for c in self.calls
            ],
            [
                msgspec.structs.replace(d, arrived_at=d.arrived_at + offset, expires_at=d.expires_at + offset)
                for d in self.devices
            ],
        )


@dataclass(slots=True, eq=False)
class _Call:
    call_id: str
    aor: str  # "" until known: an end event from routes older than its aor field came first
    started: CallStarted | None
    end_ts: float | None = None
    end: EndKind | None = None
    end_code: int | None = None
    expires: float = 0.0
    # Devices given a decision for this call (True when it was an action),
    # so each gets at most one. Created lazily: most calls never need it.
    decided: dict[str, bool] | None = None
    # Contacts (and their pn-prid) that responded on a branch of the real
    # INVITE: those devices saw the call. Created lazily as well.
    rang: set[str] | None = None
    # Devices this worker pushed for the call, and until when (engine clock)
    # a REGISTER of theirs answers that push. Created lazily as well.
    pushed: dict[str, float] | None = None
    # The next call with the same Call-ID to another account (Call-IDs are
    # the callers' choice: one can name calls to several accounts).
    other: _Call | None = None
    dropped: bool = False  # forgotten (its expiry entries are stale)


@dataclass(slots=True)
class _Device:
    reg: Register
    dev: str
    arrival: float
    expires: float
    # Calls that were ringing when this device registered (by Call-ID: they
    # are calls to its account), waiting for the settle delay in case an
    # earlier end event is still on its way.
    pending: set[str] = field(default_factory=set)


_EXPIRY_STEP: Final = 0.25


class Judged(NamedTuple):
    """A device judged against the window (see :attr:`Engine.on_judged`),
    with what decides it under any other window, all else equal: the
    replay report draws every window's coverage from one replay."""

    decision: Decision  # the decision under this engine's window
    lateness: float  # seconds past where the window starts: in time under any window at least this long
    forget_base: float  # the call's expiry under a window of 0 (engine clock)
    seen_at: float  # a call expired by then was forgotten before this judgement


def remembered(judged: Judged, window: float) -> bool:
    """Whether the call of ``judged`` was still remembered under ``window``
    (expired calls are forgotten on the timing wheel's slots)."""
    return math.ceil((judged.forget_base + window) / _EXPIRY_STEP) * _EXPIRY_STEP > judged.seen_at


# Keys of devices that answered a branch, kept per call: enough for every
# device of an account, and a bound on memory per call.
MAX_RANG: Final = 16
# Devices pushed per call whose deadline counts from their push: a call is
# pushed to the account's devices, which the push book bounds far below.
MAX_PUSHED: Final = 64
_DEVICE: Final = 1
_SETTLE: Final = 2
# Accounts named in one eviction report at most (the rest are counted as "*").
_EVICTION_ACCOUNTS: Final = 64


class Engine:
    """Call and device state; feed it events with :meth:`handle`, time with :meth:`tick`.

    A call is named by its Call-ID and the account it calls: a caller
    choosing another call's Call-ID makes a call of its own, never one
    that ends or changes the other. Every table an account can grow
    (its calls, its devices, the contacts remembered for it) is bounded per
    account: past the bound that account's oldest entry goes, never
    another's. What is evicted is reported by :meth:`take_evictions`.
    """

    def __init__(self, settings: EngineSettings | None = None) -> None:
        self.settings = settings or EngineSettings()
        self._push = PushDetector(self.settings.user_agents, self.settings.push_providers)
        # Calls by Call-ID; calls sharing a Call-ID are chained (_Call.other).
        self._calls: dict[str, _Call] = {}
        self._call_count = 0
        self._calls_by_aor: dict[str, list[_Call]] = {}  # each account's calls, oldest first
        self._devices: dict[str, dict[str, _Device]] = {}
        self._device_count = 0
        # The device behind each push device's Contact, per account, for as
        # long as it may be registered: a branch reply names a Contact, and
        # a phone that rang often re-registers from another one (same
        # +sip.instance). Least recently registered first.
        self._contact_devices: dict[str, dict[str, str]] = {}
        self._contact_count = 0
        # Device expiry and settle delays: a heap, exact to the moment.
        self._timers: list[tuple[float, int, int, str, str]] = []
        self._timer_seq = 0
        # Call expiry, two per call: a timing wheel of _EXPIRY_STEP slots, so
        # a call costs a list append instead of heap operations. A call is
        # forgotten up to one step late, which no decision depends on.
        self._expiry_slots: dict[int, list[tuple[float, _Call]]] = {}
        self._expiry_heap: list[int] = []
        self.evicted_calls = 0
        self.evicted_devices = 0
        self.evicted_contacts = 0
        # (table, account) -> evictions not yet reported
        self._evictions: dict[tuple[str, str], int] = {}
        # Ends with no transaction ("lost") from a node whose current run
        # saw the call start: that node still has the call, so the end is
        # not believed (anyone can send a CANCEL that matches nothing).
        self.lost_ends_ignored = 0
        # Told of each device judged against the window (the replay report).
        self.on_judged: Callable[[Judged], None] | None = None
        self._handled_at = -math.inf  # the time of the last event handled

    # -- introspection -------------------------------------------------

    @property
    def call_count(self) -> int:
        return self._call_count

    @property
    def device_count(self) -> int:
        return self._device_count

    def ringing(self, call_id: str, aor: str | None = None) -> bool:
        """Whether the call has started and no end of it is known (any call
        with this Call-ID when ``aor`` is None)."""
        call = self._calls.get(call_id)
        while call is not None:
            if (aor is None or call.aor == aor) and call.started is not None and call.end_ts is None:
                return True
            call = call.other
        return False

    def next_deadline(self) -> float | None:
        """When :meth:`tick` next has work (may be early, never late)."""
        timer = self._timers[0][0] if self._timers else None
        if not self._expiry_heap:
            return timer
        slot = self._expiry_heap[0] * _EXPIRY_STEP
        return slot if timer is None or slot < timer else timer

    def take_evictions(self) -> dict[tuple[str, str], int]:
        """Evictions since the last call: (table, account) -> how many; at
        most a few dozen accounts are named, the rest count under ``*``."""
        out, self._evictions = self._evictions, {}
        return out

    # -- persistence (see state.py) --------------------------------------

    def export_state(self) -> EngineState:
        """Every live call and device, as records."""
        calls = [
            CallRecord(
                c.call_id, c.aor, c.started, c.end_ts, c.end, c.end_code, c.expires,
                dict(c.decided) if c.decided else {}, sorted(c.rang) if c.rang else [],
                dict(c.pushed) if c.pushed else {},
            )
            for head in self._calls.values()
            for c in _chain(head)
        ]  # fmt: skip
        devices = [
            DeviceRecord(d.reg, d.dev, d.arrival, d.expires, sorted(d.pending))
            for table in self._devices.values()
            for d in table.values()
        ]
        return EngineState(calls, devices)

    def import_state(self, state: EngineState) -> None:
        """Take in what :meth:`export_state` gave (times on this engine's
        clock), on top of what the engine knows; a call or device it knows
        already is replaced."""
        for c in state.calls:
            known = self._find(c.call_id, c.aor)
            if known is not None:
                self._drop_call(known)
            call = self._new_call(c.call_id, c.aor)
            call.started, call.end_ts, call.end, call.end_code = c.started, c.end_ts, c.end, c.end_code
            call.decided = dict(c.decided) or None
            call.rang = set(c.rang) or None
            call.pushed = dict(list(c.pushed.items())[:MAX_PUSHED]) or None
            self._set_call_expiry(call, c.expires_at)
        for d in state.devices:
            device = _Device(d.register, d.device, d.arrived_at, d.expires_at, set(d.pending))
            self._store_device(device)
            self._remember_contact(d.register, d.device)
            if device.pending:
                self._push_timer(device.arrival + self.settings.settle, _SETTLE, d.register.aor, d.device)

    def mark_decided(self, call_id: str, device: str, aor: str | None = None) -> bool:
        """Record that ``device`` was given an action for the call (a
        journal replayed after a crash; ``aor`` None: a record from before
        calls were named by their account, every call with that Call-ID);
        False when the call is unknown."""
        marked = False
        for call in self._named(call_id, aor):
            if call.decided is None:
                call.decided = {}
            call.decided[device] = True
            marked = True
        return marked

    def pushed(self, call_id: str, aor: str, device: str, lasts: float, now: float) -> bool:
        """This worker's push of the call to ``device`` was accepted by its
        provider at ``now``, which may deliver it up to ``lasts`` seconds
        later: until then and a window more, a REGISTER of the device
        answers that push (the window counts from the push's delivery, not
        from the call's start), and the call is remembered that long.
        False when the call is unknown or holds its share of pushes."""
        call = self._find(call_id, aor)
        if call is None:
            return False
        if call.pushed is None:
            call.pushed = {}
        elif device not in call.pushed and len(call.pushed) >= MAX_PUSHED:
            self._evicted("pushed", aor)
            return False
        until = now + lasts + self.settings.window
        call.pushed[device] = until
        if until + self.settings.settle > call.expires:
            self._set_call_expiry(call, until + self.settings.settle)
        return True

    # -- input ---------------------------------------------------------

    def handle(self, event: Event, now: float, happened: float | None = None) -> list[Decision]:
        """Apply one event received at monotonic time ``now``; ``happened``
        is when it happened on that clock (its ``ts``, mapped), ``now`` when
        unknown, never later than ``now``."""
        self._handled_at = now
        if isinstance(event, Register):
            return self._on_register(event, now, now if happened is None or happened > now else happened)
        if isinstance(event, CallStarted):
            return self._on_start(event, now)
        if isinstance(event, CallEnded) and event.lost and not self._lost_end_believed(event):
            self.lost_ends_ignored += 1
            return []
        if isinstance(event, CallAnswered):
            return self._on_end(event, EndKind.ANSWERED, None, now)
        if isinstance(event, CallCancelled):
            return self._on_end(event, EndKind.CANCELLED, None, now)
        if isinstance(event, CallFailed):
            kind = EndKind.DECLINED if event.code >= 600 else EndKind.FAILED
            return self._on_end(event, kind, event.code, now)
        if isinstance(event, BranchReply):
            return self._on_branch_reply(event, now)
        if isinstance(event, CommandResult | ClaimUnused | Refused):
            return []
        raise TypeError(f"not an event: {event!r}")

    def tick(self, now: float) -> list[Decision]:
        """Expire state and settle pending registrations due by ``now``."""
        out: list[Decision] = []
        timers = self._timers
        while timers and timers[0][0] <= now:
            when, _, kind, key, sub = heapq.heappop(timers)
            if kind == _DEVICE:
                dev = self._devices.get(key, {}).get(sub)
                if dev is not None and dev.expires == when:
                    self._drop_device(key, sub)
            else:
                dev = self._devices.get(key, {}).get(sub)
                if dev is not None and dev.pending:
                    for call_id in sorted(dev.pending):
                        call = self._find(call_id, key)
                        if call is None or call.started is None:
                            continue
                        if call.decided is not None and dev.dev in call.decided:
                            continue  # decided meanwhile (a restored journal says so)
                        # Under a shorter window, a call expired by the
                        # last event's tick was forgotten by now.
                        out.append(self._decide(call, dev, call.started, self._handled_at))
                    dev.pending.clear()
        slots = self._expiry_heap
        while slots and slots[0] * _EXPIRY_STEP <= now:
            for when, call in self._expiry_slots.pop(heapq.heappop(slots)):
                if call.expires == when and not call.dropped:
                    self._drop_call(call)
        return out

    # -- calls ---------------------------------------------------------

    def _find(self, call_id: str, aor: str) -> _Call | None:
        call = self._calls.get(call_id)
        while call is not None and call.aor != aor:
            call = call.other
        return call

    def _named(self, call_id: str, aor: str | None) -> list[_Call]:
        """The calls an event names: the one call to ``aor``, or, from
        routes that do not say the account, every call with that Call-ID."""
        if aor is not None:
            call = self._find(call_id, aor)
            return [] if call is None else [call]
        head = self._calls.get(call_id)
        return [] if head is None else list(_chain(head))

    def _on_start(self, ev: CallStarted, now: float) -> list[Decision]:
        call = self._calls.get(ev.call_id)
        if call is not None and call.aor != ev.aor:
            call = self._find(ev.call_id, ev.aor)
        if call is None:
            # An end with no account may have come first (older routes).
            call = self._find(ev.call_id, "")
            if call is not None:
                call.aor = ev.aor
                self._note_account(call)
            else:
                call = self._new_call(ev.call_id, ev.aor)
        elif call.started is not None:
            return []  # a retransmission or a second branch's event
        call.started = ev
        if call.end_ts is None:
            self._set_call_expiry(call, now + self.settings.ring_timeout)
        else:
            self._set_call_expiry(call, self._ended_expiry(call, now))
        # A device may have registered before this event arrived (reordered).
        if ev.aor not in self._devices:
            return []
        return self._reevaluate(call, now)

    def _lost_end_believed(self, event: CallEnded) -> bool:
        """A lost end tells of a call started on another node, or on an
        earlier run of this one (whose transactions a restart took)."""
        calls = [c for c in self._named(event.call_id, event.aor) if c.started is not None]
        if not calls:
            return False  # no call to end: nothing a lost end could be about
        return all(
            c.started is not None and (c.started.node != event.node or c.started.boot != event.boot) for c in calls
        )

    def _on_end(self, ev: CallEnded, kind: EndKind, code: int | None, now: float) -> list[Decision]:
        call = self._calls.get(ev.call_id)
        if call is not None and call.aor == ev.aor and call.other is None:
            return self._end(call, ev.ts, kind, code, now)  # the usual case: one call with this Call-ID
        calls = self._named(ev.call_id, ev.aor)
        if not calls:
            # The end arrived before the start (reordered) or the call is not
            # one we track; keep it briefly so a late start can join it.
            calls = [self._new_call(ev.call_id, ev.aor or "")]
        out: list[Decision] = []
        for call in calls:
            out += self._end(call, ev.ts, kind, code, now)
        return out

    def _end(self, call: _Call, ts: float, kind: EndKind, code: int | None, now: float) -> list[Decision]:
        if call.end_ts is not None and call.end_ts <= ts:
            return []  # the earliest end decides how the call ended
        call.end_ts = ts
        call.end = kind
        call.end_code = code
        self._set_call_expiry(call, self._ended_expiry(call, now))
        if call.started is not None and call.aor in self._devices:
            return self._reevaluate(call, now)
        return []

    def _on_branch_reply(self, ev: BranchReply, now: float) -> list[Decision]:
        calls = self._named(ev.call_id, ev.aor)
        if not calls:
            # Before its call_start (reordered); kept like an early end.
            call = self._new_call(ev.call_id, ev.aor or "")
            self._set_call_expiry(call, now + self.settings.ring_timeout)
            calls = [call]
        keys = contact_keys(ev.contact)
        for call in calls:
            if call.rang is None:
                call.rang = set()
            elif len(call.rang) >= MAX_RANG:
                continue  # bounded: a call forks to a few devices, not hundreds
            call.rang.update(keys)
            dev = self._contact_devices.get(call.aor, {}).get(ev.contact)
            if dev is not None:
                call.rang.add(dev)
        return []

    def _ended_expiry(self, call: _Call, now: float) -> float:
        # Kamailio time and monotonic time differ; the settle delay is slack
        # enough for the milliseconds between an event and its arrival. A
        # pushed device may answer its push later than the window.
        s = self.settings
        until = now + s.window
        if call.pushed:
            until = max(until, *call.pushed.values())
        return until + s.settle

    def _new_call(self, call_id: str, aor: str) -> _Call:
        s = self.settings
        if aor:
            calls = self._calls_by_aor.get(aor)
            if calls is not None and len(calls) >= s.max_calls_per_account:
                # The account's oldest call goes, never another account's.
                self._drop_call(calls[0])
                self._evicted("calls", aor)
                self.evicted_calls += 1
        if self._call_count >= s.max_calls:
            oldest_call = next(iter(self._calls.values()))
            self._drop_call(oldest_call)
            self._evicted("calls", oldest_call.aor or "*")
            self.evicted_calls += 1
        call = _Call(call_id, aor, None)
        head = self._calls.get(call_id)
        if head is None:
            self._calls[call_id] = call
        else:
            call.other = head.other
            head.other = call
        self._call_count += 1
        self._note_account(call)  # (an eviction above may have emptied the account's list)
        return call

    def _note_account(self, call: _Call) -> None:
        if call.aor:
            calls = self._calls_by_aor.get(call.aor)
            if calls is None:
                self._calls_by_aor[call.aor] = [call]
            else:
                calls.append(call)

    def _set_call_expiry(self, call: _Call, when: float) -> None:
        call.expires = when
        slot = math.ceil(when / _EXPIRY_STEP)
        entries = self._expiry_slots.get(slot)
        if entries is None:
            self._expiry_slots[slot] = [(when, call)]
            heapq.heappush(self._expiry_heap, slot)
        else:
            entries.append((when, call))

    def _drop_call(self, call: _Call) -> None:
        head = self._calls[call.call_id]
        if head is call:
            if call.other is None:
                del self._calls[call.call_id]
            else:
                self._calls[call.call_id] = call.other
        else:
            while head.other is not call:
                assert head.other is not None
                head = head.other
            head.other = call.other
        call.other = None
        call.dropped = True
        self._call_count -= 1
        calls = self._calls_by_aor.get(call.aor)
        if calls is not None:
            with contextlib.suppress(ValueError):
                calls.remove(call)
            if not calls:
                del self._calls_by_aor[call.aor]

    def _reevaluate(self, call: _Call, now: float) -> list[Decision]:
        started = call.started
        devices = self._devices.get(call.aor)
        if started is None or not devices:
            return []
        out: list[Decision] = []
        key = call.call_id
        for dev in devices.values():
            if dev.reg.ts < started.ts or (call.decided is not None and dev.dev in call.decided):
                continue
            if call.end_ts is None:
                if dev.arrival + self.settings.settle > now:
                    self._add_pending(dev, key)
                continue
            if dev.reg.ts >= call.end_ts or dev.arrival + self.settings.settle > now:
                dev.pending.discard(key)
                out.append(self._decide(call, dev, started))
        return out

    # -- devices -------------------------------------------------------

    def _on_register(self, reg: Register, now: float, happened: float) -> list[Decision]:
        if reg.expires == 0:
            return []  # an unregistration wakes no one
        if not self._push.is_push(reg):
            return []  # desk phones and Android apps get their INVITEs
        dev_key = device_id(reg)
        dev = _Device(reg, dev_key, happened, happened + self.settings.deadline)
        self._store_device(dev)
        self._remember_contact(reg, dev_key)
        calls = self._calls_by_aor.get(reg.aor)
        if not calls:
            return []
        out: list[Decision] = []
        for call in list(calls):
            started = call.started
            if started is None or reg.ts < started.ts:
                continue  # no caller details yet, or registered before the call
            ended_before = call.end_ts is not None and call.end_ts <= reg.ts
            if call.decided is not None and dev_key in call.decided:
                if ended_before and call.decided[dev_key]:
                    out.append(self._decision(call, dev, started, Action.NONE, Reason.DUPLICATE))
                continue
            if call.end_ts is None:
                # Ringing now, but an end event stamped before this REGISTER
                # may still be on its way: decide after the settle delay.
                self._add_pending(dev, call.call_id)
            else:
                out.append(self._decide(call, dev, started, now))
        return out

    def _remember_contact(self, reg: Register, dev_key: str) -> None:
        s = self.settings
        table = self._contact_devices
        contacts = table.get(reg.aor)
        if contacts is None:
            contacts = table[reg.aor] = {}
        elif contacts.pop(reg.contact, None) is not None:
            self._contact_count -= 1
        if len(contacts) >= s.max_devices_per_account:
            del contacts[next(iter(contacts))]  # the account's least recently registered
            self._contact_count -= 1
            self._evicted("contacts", reg.aor)
            self.evicted_contacts += 1
        elif self._contact_count >= s.max_devices:
            # The account first seen longest ago gives one up (its own, when
            # it is the only one).
            aor, oldest = next(iter(table.items()))
            if oldest:
                del oldest[next(iter(oldest))]
                self._contact_count -= 1
                self._evicted("contacts", aor)
                self.evicted_contacts += 1
            if not oldest and oldest is not contacts:
                del table[aor]
        contacts[reg.contact] = dev_key
        self._contact_count += 1

    def _store_device(self, dev: _Device) -> None:
        aor = dev.reg.aor
        known = self._devices.get(aor)
        if known is not None and dev.dev in known:
            # Keep the calls still waiting to settle for this device; it is
            # the account's most recently registered now.
            dev.pending = known.pop(dev.dev).pending
        else:
            if known is not None and len(known) >= self.settings.max_devices_per_account:
                # The account's oldest device goes, never another account's.
                self._drop_device(aor, next(iter(known)))
                self._evicted("devices", aor)
                self.evicted_devices += 1
            elif self._device_count >= self.settings.max_devices:
                # Before looking up the account's table: evicting may remove
                # that very table (its only device was the oldest).
                self._evict_device()
            self._device_count += 1
        self._devices.setdefault(aor, {})[dev.dev] = dev
        self._push_timer(dev.expires, _DEVICE, aor, dev.dev)

    def _evict_device(self) -> None:
        # The device table is a dict of dicts; the oldest AOR's first device
        # is a cheap approximation of the least recently registered one.
        aor, devices = next(iter(self._devices.items()))
        self._drop_device(aor, next(iter(devices)))
        self._evicted("devices", aor)
        self.evicted_devices += 1

    def _drop_device(self, aor: str, dev: str) -> None:
        devices = self._devices[aor]
        del devices[dev]
        self._device_count -= 1
        if not devices:
            del self._devices[aor]

    def _add_pending(self, dev: _Device, key: str) -> None:
        if not dev.pending:
            self._push_timer(dev.arrival + self.settings.settle, _SETTLE, dev.reg.aor, dev.dev)
        dev.pending.add(key)

    def _evicted(self, table: str, aor: str) -> None:
        key = (table, aor)
        if key not in self._evictions and len(self._evictions) >= _EVICTION_ACCOUNTS:
            key = (table, "*")
        self._evictions[key] = self._evictions.get(key, 0) + 1

    # -- decisions -----------------------------------------------------

    def _decide(self, call: _Call, dev: _Device, started: CallStarted, seen_at: float = -math.inf) -> Decision:
        """Final decision for a device whose REGISTER time is now known to be
        before or after the call's end. Records it so it is made only once.
        ``seen_at``: the call had to be remembered until then (for
        :attr:`on_judged`; -inf: its expiry was just set)."""
        decision = self._judge(call, dev, started, seen_at)
        if call.decided is None:
            call.decided = {}
        call.decided[dev.dev] = decision.action is not Action.NONE
        return decision

    def _judge(self, call: _Call, dev: _Device, started: CallStarted, seen_at: float) -> Decision:
        if call.end_ts is None or call.end_ts > dev.reg.ts:
            return self._decision(call, dev, started, Action.NONE, Reason.RINGING)
        if call.rang is not None and not call.rang.isdisjoint(device_keys(dev.reg)):
            return self._decision(call, dev, started, Action.NONE, Reason.RANG)
        assert call.end is not None
        until = call.pushed.get(dev.dev) if call.pushed is not None else None
        if until is not None:
            # Pushed by this worker: its provider may have delivered the
            # push late (a phone offline), and the phone shows the call from
            # the delivery on.
            late = dev.arrival > until
        else:
            anchor = call.end_ts if self.settings.anchor is Anchor.END else started.ts
            late = dev.reg.ts - anchor > self.settings.window
        if late:
            decision = self._decision(call, dev, started, Action.NONE, Reason.TOO_LATE)
        else:
            action = Action.FAKE_CALL if self.settings.strategy is Strategy.FAKE_CALL else Action.MESSAGE
            decision = self._decision(call, dev, started, action, call.end.reason)
        if self.on_judged is not None:
            window = self.settings.window
            lateness = dev.arrival - (until - window) if until is not None else dev.reg.ts - anchor
            self.on_judged(Judged(decision, lateness, call.expires - window, seen_at))
        return decision

    def _decision(self, call: _Call, dev: _Device, started: CallStarted, action: Action, reason: Reason) -> Decision:
        reg = dev.reg
        since_end = None if call.end_ts is None or call.end_ts > reg.ts else reg.ts - call.end_ts
        end = call.end if since_end is not None else None
        if action is Action.NONE:
            return Decision(
                reg.ts, reg.node, call.call_id, call.aor, dev.dev, action, reason, reg.ts - started.ts, since_end, end
            )
        assert call.end is not None
        info = CallInfo(
            call.call_id,
            call.aor,
            started.from_user,
            started.from_name,
            started.from_domain,
            call.end,
            call.end_code,
            started.domain,
        )
        return Act(
            reg.ts, reg.node, call.call_id, call.aor, dev.dev, action, reason, reg.ts - started.ts, since_end, end,
            call=info, register=reg, deadline=dev.arrival + self.settings.deadline,
        )  # fmt: skip

    def _push_timer(self, when: float, kind: int, key: str, sub: str) -> None:
        self._timer_seq += 1
        heapq.heappush(self._timers, (when, self._timer_seq, kind, key, sub))


def _chain(head: _Call) -> Iterator[_Call]:
    call: _Call | None = head
    while call is not None:
        yield call
        call = call.other
