"""Each Kamailio node's clock against the clock the engine runs on, and
the worker's own pauses.

Events carry their node's timestamp; a REGISTER's deadline counts from
when it happened, so its ``ts`` is mapped onto the engine's clock
(protocol.py). health.py measures each node's offset with its pings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, NamedTuple

__all__ = ["PAUSED", "Measured", "NodeClocks"]

# A timer that fires this much later than asked says the worker itself did
# not run meanwhile (SIGSTOP, swapped out, a paused VM, a starved CPU):
# what it waited for may be waiting unread, so it is not a timeout.
PAUSED: Final = 0.25

# A ping answered in more than twice this says little about the clocks
# (the worker or the node was busy): it is not used.
_MAX_UNCERTAINTY: Final = 0.25
# The best measurement stands this long before any usable one replaces it:
# clocks drift, slowly.
_KEEP: Final = 600.0


class Measured(NamedTuple):
    """A node's clock as a ping measured it, on the engine's clock."""

    node: str
    offset: float  # the node's clock minus ours
    uncertainty: float  # half the round trip it was measured in
    at: float  # when


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

    def ping(self, node: str, sent: float, received: float, ts: float) -> Measured | None:
        """A ping sent at ``sent`` was answered, stamped ``ts`` by the node,
        and received at ``received`` (both on the engine's clock). Returns
        the measurement when it is now the one used (the journal and the
        capture keep it, so a restore and a replay place times alike)."""
        uncertainty = (received - sent) / 2
        if not (math.isfinite(ts) and 0 <= uncertainty <= _MAX_UNCERTAINTY):
            return None
        value = ts - (sent + received) / 2
        best = self._offsets.get(node)
        if best is None or uncertainty <= best.uncertainty or received - best.measured > _KEEP:
            self._offsets[node] = _Offset(value, uncertainty, received)
            return Measured(node, value, uncertainty, received)
        return None

    def measured(self, node: str, offset: float, uncertainty: float, at: float) -> None:
        """A measurement :meth:`ping` made before, from the journal or a
        capture (its offset and time on this clock)."""
        if math.isfinite(offset) and math.isfinite(at) and 0 <= uncertainty <= _MAX_UNCERTAINTY:
            self._offsets[node] = _Offset(offset, uncertainty, at)

    def offset(self, node: str) -> float:
        """The node's clock minus the engine's, as well as it is known."""
        known = self._offsets.get(node)
        return known.value if known is not None else self.wall_offset

    def local(self, node: str, ts: float) -> float | None:
        """The node's timestamp ``ts`` on the engine's clock (None: not a time)."""
        mapped = ts - self.offset(node)
        return mapped if math.isfinite(mapped) else None
