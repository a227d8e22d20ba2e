"""The one path from a node's event to the engine's decisions, taken by the
live worker, by a restore from disk and by a replay alike, so that they
cannot disagree.

Two things happen on the way: a REGISTER is routed by the node it came in
from (that node holds the device's connection and takes its fake call),
and its timestamp, on the node's clock, is mapped onto the clock the
engine runs on, so the fake call's deadline counts from the REGISTER and
not from when the worker read it. The push book hears REGISTERs and call
starts too: a call start gives the pushes it needs to ``on_push`` (unset
while a restore replays the journal: those calls are long gone).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import msgspec

from .engine import Decision, Engine
from .events import CallStarted, Event, Register
from .push_book import PushBook, PushJob

__all__ = ["Intake", "NodeClocks"]

# A ping answered in more than twice this says little about the clocks
# (the worker or the node was busy): it is not used.
_MAX_UNCERTAINTY: Final = 0.25
# The best measurement stands this long before any usable one replaces it:
# clocks drift, slowly.
_KEEP: Final = 600.0


@dataclass(slots=True)
class _Offset:
    value: float  # the node's clock minus ours
    uncertainty: float  # half the round trip it was measured in
    measured: float  # when, on our clock


class NodeClocks:
    """Each node's clock against the one the engine runs on.

    Until a node answers a ping, its clock is taken to be this machine's
    wall clock (``wall_offset``: the wall clock minus the engine's clock;
    nodes and workers keep time with NTP). A ping answered quickly measures
    it: the node stamped its answer between sending and receiving, so the
    offset is known to within half the round trip.
    """

    def __init__(self, wall_offset: float) -> None:
        self.wall_offset = wall_offset
        self._offsets: dict[str, _Offset] = {}

    def ping(self, node: str, sent: float, received: float, ts: float) -> None:
        """A ping sent at ``sent`` was answered, stamped ``ts`` by the node,
        and received at ``received`` (both on the engine's clock)."""
        uncertainty = (received - sent) / 2
        if not (math.isfinite(ts) and 0 <= uncertainty <= _MAX_UNCERTAINTY):
            return
        value = ts - (sent + received) / 2
        best = self._offsets.get(node)
        if best is None or uncertainty <= best.uncertainty or received - best.measured > _KEEP:
            self._offsets[node] = _Offset(value, uncertainty, received)

    def offset(self, node: str) -> float:
        """The node's clock minus the engine's, as well as it is known."""
        known = self._offsets.get(node)
        return known.value if known is not None else self.wall_offset

    def local(self, node: str, ts: float) -> float | None:
        """The node's timestamp ``ts`` on the engine's clock (None: not a time)."""
        mapped = ts - self.offset(node)
        return mapped if math.isfinite(mapped) else None


class Intake:
    """Feeds events to the engine: :meth:`feed` is all there is."""

    def __init__(self, engine: Engine, clocks: NodeClocks, book: PushBook | None = None) -> None:
        self.engine = engine
        self.clocks = clocks
        self.book = book
        self.on_push: Callable[[list[PushJob]], None] | None = None

    def feed(self, node: str, event: Event, now: float) -> list[Decision]:
        """The decisions ``event``, received from ``node`` at ``now``, leads to."""
        if isinstance(event, CallStarted) and self.book is not None:
            jobs = self.book.call_started(event, now)
            if jobs and self.on_push is not None:
                self.on_push(jobs)
        if not isinstance(event, Register):
            return self.engine.handle(event, now)
        if event.node != node:
            # Route by the connection the REGISTER came in on.
            event = msgspec.structs.replace(event, node=node)
        mapped = self.clocks.local(node, event.ts)
        # Never later than it was read (a node's clock a little ahead).
        happened = now if mapped is None else min(mapped, now)
        if self.book is not None:
            self.book.register(event, happened)
        return self.engine.handle(event, now, happened)
