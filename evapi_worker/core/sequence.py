"""Per-node sequence tracking: how many events did evapi lose?

Every event carries its node's sequence number and the node's start time
(``boot``). evapi drops events while no client is connected, so a gap in the
numbers is lost events. But events from different Kamailio SIP workers
arrive out of order, so a gap is only counted once it stayed open for a
grace period of the worker's own running time: while the worker was stopped
(SIGSTOP, swapped out, a paused VM) the event that fills a gap may be
waiting unread in its socket, so that time does not count (:meth:`paused`).

Kamailio's counter is a C int: after 2**31 - 1 comes -2**31. Numbers are
compared as 32-bit serial numbers (RFC 1982), so the wrap is no gap. And a
number no node could have reached (more events since the last one than a
node emits in the time between their timestamps) is rejected, not counted
as billions lost: only a forged or damaged event says that. Pure: time is
passed in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

__all__ = ["MAX_EVENT_RATE", "REJECTED", "SequenceTracker"]

_MOD: Final = 1 << 32
_HALF: Final = 1 << 31
# More events a second than any node emits (one Kamailio SIP worker emits
# about 50,000 a second; its queue drops what evapi or Redis cannot take,
# each drop a number): a gap wider than this rate allows between two
# events' timestamps is not a loss, it is no sequence of that node.
MAX_EVENT_RATE: Final = 1_000_000
REJECTED: Final = -1
"""What :meth:`SequenceTracker.observe` returns for a number no node could
have sent: the event is not taken."""


def _wrap(value: int) -> int:
    """``value`` as the signed 32-bit number Kamailio would print."""
    return (value + _HALF) % _MOD - _HALF


@dataclass(slots=True)
class _Node:
    boot: int
    highest: int
    ts: float  # Kamailio's timestamp of the event numbered ``highest``
    missing: dict[int, float] = field(default_factory=dict)
    previous_boot: int | None = None


class SequenceTracker:
    """Counts lost events per node from sequence gaps."""

    def __init__(self, grace: float = 2.0, max_missing: int = 10_000) -> None:
        self.grace = grace
        self.max_missing = max_missing
        self._nodes: dict[str, _Node] = {}
        # Seconds the worker did not run: gaps are timed on ``now - _paused``.
        self._paused = 0.0

    def paused(self, seconds: float) -> None:
        """The worker did not run for ``seconds``: open gaps did not age."""
        if seconds > 0:
            self._paused += seconds

    def observe(self, node: str, boot: int, seq: int, now: float, ts: float = 0.0) -> int:
        """Record one event (``ts``: Kamailio's timestamp of it); returns
        events now known lost (beyond waiting), or :data:`REJECTED` for a
        number the node cannot have sent (the event is not to be taken)."""
        state = self._nodes.get(node)
        if state is None:
            # First event seen from this node: what came before was sent
            # before this worker existed, which is not a loss.
            self._nodes[node] = _Node(boot, seq, ts)
            return 0
        if boot != state.boot:
            if boot == state.previous_boot:
                return 0  # a straggler from before the restart
            # Kamailio restarted: the old boot's gaps will never fill, and the
            # new boot's events before this one went to nobody. (Boot ids are
            # compared for identity only: they need not grow.)
            before = (seq - 1) % _MOD
            if not self._plausible(before, ts - state.ts):
                return REJECTED
            lost = len(state.missing) + before
            self._nodes[node] = _Node(boot, seq, ts, previous_boot=state.boot)
            return lost
        ahead = (seq - state.highest) % _MOD
        if ahead == 0:
            return 0  # a duplicate
        if ahead >= _HALF:
            state.missing.pop(seq, None)  # a reordered event filled its gap
            return 0
        gap = ahead - 1
        if gap and not self._plausible(gap, ts - state.ts):
            return REJECTED
        state.highest = seq
        state.ts = max(state.ts, ts)
        if gap == 0:
            return 0
        room = self.max_missing - len(state.missing)
        if gap > room:
            # Too many to wait for one by one: count the gap at once.
            return gap
        running = now - self._paused
        for k in range(seq - gap, seq):
            state.missing[_wrap(k)] = running
        return 0

    @staticmethod
    def _plausible(gap: int, seconds: float) -> bool:
        """Whether a node can have numbered ``gap`` events in ``seconds``
        (the time between two of its events' stamps, plus one of slack)."""
        return gap <= (max(0.0, seconds) + 1.0) * MAX_EVENT_RATE

    def expire(self, now: float) -> list[tuple[str, int]]:
        """Gaps open longer than the grace period, as (node, lost) pairs."""
        out: list[tuple[str, int]] = []
        deadline = now - self._paused - self.grace
        for name, state in self._nodes.items():
            if not state.missing:
                continue
            old = [seq for seq, seen in state.missing.items() if seen <= deadline]
            for seq in old:
                del state.missing[seq]
            if old:
                out.append((name, len(old)))
        return out

    def pending(self, node: str) -> int:
        """Sequence numbers of ``node`` still waited for."""
        state = self._nodes.get(node)
        return len(state.missing) if state else 0
