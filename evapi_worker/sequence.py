"""Per-node sequence tracking: how many events did evapi lose?

Every event carries its node's sequence number and the node's start time
(``boot``). evapi drops events while no client is connected, so a gap in the
numbers is lost events. But events from different Kamailio SIP workers
arrive out of order, so a gap is only counted once it stayed open for a
grace period of the worker's own running time: while the worker was stopped
(SIGSTOP, swapped out, a paused VM) the event that fills a gap may be
waiting unread in its socket, so that time does not count (:meth:`paused`).
Pure: time is passed in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["SequenceTracker"]


@dataclass(slots=True)
class _Node:
    boot: int
    highest: int
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

    def observe(self, node: str, boot: int, seq: int, now: float) -> int:
        """Record one event; returns events now known lost (beyond waiting)."""
        state = self._nodes.get(node)
        if state is None:
            # First event seen from this node: what came before was sent
            # before this worker existed, which is not a loss.
            self._nodes[node] = _Node(boot, seq)
            return 0
        if boot != state.boot:
            if boot == state.previous_boot:
                return 0  # a straggler from before the restart
            # Kamailio restarted: the old boot's gaps will never fill, and the
            # new boot's events before this one went to nobody. (Boot ids are
            # compared for identity only: they need not grow.)
            lost = len(state.missing) + max(0, seq - 1)
            self._nodes[node] = _Node(boot, seq, previous_boot=state.boot)
            return lost
        if seq > state.highest:
            gap = seq - state.highest - 1
            state.highest = seq
            if gap == 0:
                return 0
            room = self.max_missing - len(state.missing)
            if gap > room:
                # Too many to wait for one by one: count the gap at once.
                return gap
            running = now - self._paused
            for missing in range(seq - gap, seq):
                state.missing[missing] = running
            return 0
        state.missing.pop(seq, None)  # a reordered event filled its gap
        return 0

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
