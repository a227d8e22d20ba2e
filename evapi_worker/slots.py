"""Fake-call slots shared fairly between accounts.

A burst of late phones can outnumber the fake calls the worker runs at
once. Slots are then handed out round-robin between the accounts that
wait, not in arrival order, and no account holds more than its share at
once: a ring group's ten iPhones, or phones that ignore the CANCEL, cost
their own account time, never another's.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

import trio

__all__ = ["FairSlots"]


@dataclass(eq=False)
class _Waiter:
    key: str
    granted: bool = False
    event: trio.Event = field(default_factory=trio.Event)


class FairSlots:
    """At most ``total`` holders, at most ``per_key`` of them with one key."""

    def __init__(self, total: int, per_key: int) -> None:
        if total < 1 or per_key < 1:
            raise ValueError("total and per_key must be at least 1")
        self.total = total
        self.per_key = per_key
        self.borrowed = 0
        self._held: dict[str, int] = {}
        # Keys with waiters, in the order they are served; each key's waiters in arrival order.
        self._queues: OrderedDict[str, deque[_Waiter]] = OrderedDict()
        self.capped = 0  # acquisitions that waited because their key held its share

    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def held(self, key: str) -> int:
        return self._held.get(key, 0)

    def at_share(self, key: str) -> bool:
        """Whether ``key`` holds all the slots it may (its next one waits)."""
        return self._held.get(key, 0) >= self.per_key

    def try_acquire(self, key: str) -> bool:
        """Take a slot for ``key`` if one is free to it now, without waiting."""
        if self.borrowed < self.total and not self.at_share(key) and key not in self._queues:
            self._take(key)
            return True
        return False

    async def acquire(self, key: str) -> None:
        """Wait for a slot for ``key``; cancellation leaves nothing held."""
        if self.try_acquire(key):
            await trio.lowlevel.checkpoint()
            return
        if self.at_share(key):
            self.capped += 1
        waiter = _Waiter(key)
        self._queues.setdefault(key, deque()).append(waiter)
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.granted:
                self.release(key)  # handed over just as it was cancelled
            else:
                self._forget(waiter)
            raise

    def release(self, key: str) -> None:
        """Give back a slot of ``key``; the next account in turn may take it."""
        count = self._held.get(key, 0)
        if count <= 0:
            raise RuntimeError(f"release of a slot {key!r} does not hold")
        if count == 1:
            del self._held[key]
        else:
            self._held[key] = count - 1
        self.borrowed -= 1
        self._hand_over()

    def _take(self, key: str) -> None:
        self.borrowed += 1
        self._held[key] = self._held.get(key, 0) + 1

    def _hand_over(self) -> None:
        """Grant free slots to waiting keys, one per key per round."""
        while self.borrowed < self.total and self._queues:
            for key in list(self._queues):
                if self.borrowed >= self.total:
                    return
                queue = self._queues[key]
                if self.at_share(key):
                    continue
                waiter = queue.popleft()
                if not queue:
                    del self._queues[key]
                else:
                    self._queues.move_to_end(key)  # its next waiter goes after the other keys
                self._take(key)
                waiter.granted = True
                waiter.event.set()
                break
            else:
                return  # every waiting key holds its share

    def _forget(self, waiter: _Waiter) -> None:
        queue = self._queues.get(waiter.key)
        if queue is None:
            return
        try:
            queue.remove(waiter)
        except ValueError:
            return
        if not queue:
            del self._queues[waiter.key]
