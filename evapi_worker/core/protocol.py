"""The worker's protocol: what a node's frame means and what follows from it.

Sans-I/O, like h11's ``Connection``: :class:`Protocol` is fed a node's
payloads with the time they were read and answers with a :class:`Received`
(one class per kind of frame) saying what the frame was and what it led to (the engine's decisions, the
pushes a call needs, events now known lost). It sends nothing, counts
nothing and logs nothing; the service does that with the answer. The live
worker (:meth:`Protocol.receive`), a restore from the journal
(:meth:`Protocol.restore`) and a replay of a capture (:meth:`Protocol.feed`)
all take this one path, so they cannot disagree.

On the way, a REGISTER is routed by the node whose connection brought it
(that node holds the device's connection and takes its fake call), and its
timestamp, on the node's clock, is mapped onto the engine's clock
(clocks.py), so its deadline counts from the REGISTER and not from when the
worker read it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import msgspec

from .clocks import Measured, NodeClocks
from .engine import Decision, Engine
from .events import (
    CallStarted,
    ClaimUnused,
    CommandResult,
    Event,
    EventError,
    EventErrorReason,
    Refused,
    Register,
    UnknownEventError,
    parse_event,
    peek_sequence,
)
from .push_book import PushBook, PushJob
from .sequence import REJECTED, SequenceTracker

__all__ = [
    "Acknowledged",
    "ClaimNotUsed",
    "Decided",
    "Protocol",
    "Received",
    "Rejected",
    "SipRefused",
    "Skipped",
    "decisions_of",
]


class Received(msgspec.Struct, gc=False):
    """What a frame was, and what it led to: one of the classes below
    (Structs, built positionally: one is made per event on the ingest
    path, where a plain class's construction cost five times as much)."""


class Decided(Received, gc=False):
    """An event the engine took (its decisions may be none)."""

    event: Event
    decisions: Sequence[Decision] = ()
    pushes: Sequence[PushJob] = ()  # a call start's pushes
    named: str | None = None  # the node the event names, when not its connection's
    lost_end_ignored: bool = False  # a call end the node sent after losing track, not believed
    unknown_fields: tuple[str, ...] = ()  # left out: a newer config sends them
    lost: int = 0  # events of this node now known lost (a gap, a restart)


class Acknowledged(Received, gc=False):
    """A command's acknowledgement: for the connection that sent it."""

    event: CommandResult
    named: str | None = None
    unknown_fields: tuple[str, ...] = ()
    lost: int = 0


class ClaimNotUsed(Received, gc=False):
    """A node says a claim was never used."""

    event: ClaimUnused
    named: str | None = None
    unknown_fields: tuple[str, ...] = ()
    lost: int = 0


class SipRefused(Received, gc=False):
    """A node refused SIP data (forged, or not carried intact)."""

    event: Refused
    named: str | None = None
    unknown_fields: tuple[str, ...] = ()
    lost: int = 0


class Skipped(Received, gc=False):
    """A valid event of a type this version does not know."""

    error: EventError


class Rejected(Received, gc=False):
    """Not a valid event."""

    error: EventError


Read = Decided | Acknowledged | ClaimNotUsed | SipRefused
"""A frame that was an event."""

# Events that are not for the engine, by their class.
_NOT_DECIDED: Final[dict[type, type[Acknowledged] | type[ClaimNotUsed] | type[SipRefused]]] = {
    CommandResult: Acknowledged,
    ClaimUnused: ClaimNotUsed,
    Refused: SipRefused,
}


def decisions_of(got: Received) -> Sequence[Decision]:
    """What the engine decided on a frame (nothing, when it was no event for it)."""
    return got.decisions if type(got) is Decided else ()


class Protocol:
    """Frames in, meanings out; time is passed in."""

    def __init__(
        self,
        engine: Engine,
        clocks: NodeClocks,
        book: PushBook | None = None,
        sequences: SequenceTracker | None = None,
    ) -> None:
        self.engine = engine
        self.clocks = clocks
        self.book = book
        self.sequences = sequences if sequences is not None else SequenceTracker()

    def receive(self, node: str, payload: bytes, now: float) -> Read | Skipped | Rejected:
        """A frame read live from ``node`` at ``now``: parsed, its sequence
        number tracked, then :meth:`feed`."""
        try:
            parsed = parse_event(payload)
        except UnknownEventError as exc:
            return Skipped(exc)
        except EventError as exc:
            return Rejected(exc)
        event = parsed.event
        lost = self.sequences.observe(node, event.boot, event.seq, now, event.ts)
        if lost == REJECTED:
            why = f"sequence number {event.seq} is further from the last one than the node can have counted"
            return Rejected(EventError(EventErrorReason.BAD_SEQUENCE, why))
        got = self.feed(node, event, now)
        got.unknown_fields = parsed.unknown_fields
        got.lost = lost
        return got

    def restore(self, node: str, payload: bytes, now: float) -> Read | Skipped | Rejected:
        """A frame from the journal, fed again after a restart. Its sequence
        number is not tracked: the journal holds only the events the engine
        took, and the node's numbers go on from where the live ones are."""
        try:
            event = parse_event(payload).event
        except UnknownEventError as exc:
            return Skipped(exc)
        except EventError as exc:
            return Rejected(exc)
        return self.feed(node, event, now)

    def shed(self, node: str, payload: bytes, now: float) -> int:
        """A frame dropped unread under overload: its sequence number is
        noted (shed, not lost); returns events now known lost."""
        numbers = peek_sequence(payload)
        if numbers is None:
            return 0
        return max(0, self.sequences.observe(node, numbers[0], numbers[1], now, numbers[2]))

    def expire(self, now: float) -> list[tuple[str, int]]:
        """Sequence gaps that stayed open past the grace, as (node, lost)."""
        return self.sequences.expire(now)

    def paused(self, seconds: float) -> None:
        """The worker did not run for ``seconds``: what it has not read yet
        may fill the gaps open now, so they do not age meanwhile."""
        self.sequences.paused(seconds)

    def ping(self, node: str, sent: float, received: float, ts: float) -> Measured | None:
        """A ping sent at ``sent``, answered with the node's stamp ``ts``,
        read at ``received``: the node's clock measured. Returns the
        measurement when it is the one used from now on (to be journaled
        and captured: :meth:`measured` gives it back to a restore or a
        replay at the same point among the events)."""
        return self.clocks.ping(node, sent, received, ts)

    def measured(self, node: str, offset: float, uncertainty: float, at: float) -> None:
        """A measurement :meth:`ping` returned, read back (on this clock)."""
        self.clocks.measured(node, offset, uncertainty, at)

    def next_deadline(self) -> float | None:
        """When :meth:`tick` next has work (may be early, never late)."""
        return self.engine.next_deadline()

    def tick(self, now: float) -> list[Decision]:
        """What is due by ``now``: settle delays that ran out, state that
        expired. The live timer calls it at each deadline; every event
        calls it first (:meth:`feed`), so a restore or a replay, which have
        no timer, decide in the same order as the live worker did."""
        return self.engine.tick(now)

    def feed(self, node: str, event: Event, now: float) -> Read:
        """An event from ``node``, received at ``now``, and what it leads to
        (after what was due before it)."""
        named = event.node if event.node != node else None
        other = _NOT_DECIDED.get(type(event))
        if other is not None:
            return other(event, named)  # type: ignore[arg-type]
        engine = self.engine
        book = self.book
        due = engine.next_deadline()
        ticked = engine.tick(now) if due is not None and due <= now else None
        if not isinstance(event, Register):
            pushes = book.call_started(event, now) if book is not None and isinstance(event, CallStarted) else ()
            ignored = engine.lost_ends_ignored
            decisions = engine.handle(event, now)
            if ticked:
                decisions = ticked + decisions
            return Decided(event, decisions, pushes, named, engine.lost_ends_ignored > ignored)
        if named is not None:
            # Route by the connection the REGISTER came in on.
            event = msgspec.structs.replace(event, node=node)
        mapped = self.clocks.local(node, event.ts)
        # Never later than it was read (a node's clock a little ahead).
        happened = now if mapped is None else min(mapped, now)
        if book is not None:
            book.register(event, happened)
        decisions = engine.handle(event, now, happened)
        return Decided(event, ticked + decisions if ticked else decisions, (), named)
