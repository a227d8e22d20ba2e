"""Fake-call slots shared fairly between accounts.

A burst of late phones can outnumber the fake calls the worker runs at
once. Slots are then handed out to the waiting account that holds the
fewest, round-robin between accounts that hold as many, not in arrival
order; no account holds more than its share at once. And a few slots
beyond the total (the reserve) are for accounts that hold none: however
many rude accounts fill the slots with phones that ring and never answer
the CANCEL, the next account's first late phone does not wait for them.
A ring group's ten iPhones, or phones that ignore the CANCEL, cost their
own account time, never another's.
"""

from __future__ import annotations

import heapq
import itertools
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
    """At most ``total`` holders, at most ``per_key`` of them with one key;
    up to ``reserve`` more for keys that hold none."""

    def __init__(self, total: int, per_key: int, reserve: int = 0) -> None:
        if total < 1 or per_key < 1 or reserve < 0:
            raise ValueError("total and per_key must be at least 1, reserve at least 0")
        self.total = total
        self.per_key = per_key
        self.reserve = reserve
        self.borrowed = 0
        self._held: dict[str, int] = {}
        # Each waiting key's waiters, in arrival order.
        self._queues: OrderedDict[str, deque[_Waiter]] = OrderedDict()
        # The waiting keys by (slots held, turn): the first valid entry is
        # served next. A key's entry is renewed when what it holds changes,
        # so it moves behind the keys that hold as many (its turn passed);
        # older entries of it are stale (``_turns`` names the valid one).
        self._order: list[tuple[int, int, str]] = []
        self._turns: dict[str, int] = {}
        self._turn = itertools.count()
        self.capped = 0  # acquisitions that waited because their key held its share

    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def held(self, key: str) -> int:
        return self._held.get(key, 0)

    def at_share(self, key: str) -> bool:
        """Whether ``key`` holds all the slots it may (its next one waits)."""
        return self._held.get(key, 0) >= self.per_key

    def _free_for(self, held: int) -> bool:
        """Whether a slot is free to a key that holds ``held``."""
        if held >= self.per_key:
            return False
        return self.borrowed < self.total or (held == 0 and self.borrowed < self.total + self.reserve)

    def try_acquire(self, key: str) -> bool:
        """Take a slot for ``key`` if one is free to it now, without waiting."""
        if key not in self._queues and self._free_for(self._held.get(key, 0)):
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
        queue = self._queues.get(key)
        if queue is None:
            self._queues[key] = deque((waiter,))
            self._queue_turn(key)
        else:
            queue.append(waiter)
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.granted:
                self.release(key)  # handed over just as it was cancelled
            else:
                self._forget(waiter)
            raise

    def release(self, key: str) -> None:
        """Give back a slot of ``key``; the waiting account that holds the
        fewest may take it."""
        count = self._held.get(key, 0)
        if count <= 0:
            raise RuntimeError(f"release of a slot {key!r} does not hold")
        if count == 1:
            del self._held[key]
        else:
            self._held[key] = count - 1
        self.borrowed -= 1
        if key in self._queues:
            self._queue_turn(key)  # it holds fewer now
        self._hand_over()

    def _take(self, key: str) -> None:
        self.borrowed += 1
        self._held[key] = self._held.get(key, 0) + 1

    def _queue_turn(self, key: str) -> None:
        turn = next(self._turn)
        self._turns[key] = turn
        heapq.heappush(self._order, (self._held.get(key, 0), turn, key))
        if len(self._order) > 4 * len(self._turns) + 64:
            # Mostly stale entries: only the valid ones are kept.
            self._order = [e for e in self._order if self._turns.get(e[2]) == e[1]]
            heapq.heapify(self._order)

    def _hand_over(self) -> None:
        """Grant free slots to waiting keys, the fewest held first."""
        order = self._order
        while order:
            held, turn, key = order[0]
            if self._turns.get(key) != turn:
                heapq.heappop(order)  # stale: the key was served, renewed or gave up
                continue
            if not self._free_for(held):
                if held >= self.per_key:
                    # At its share: it waits apart until it releases one
                    # (which renews its turn); the next key may go first.
                    heapq.heappop(order)
                    del self._turns[key]
                    continue
                return  # no slot for the key that holds the fewest: none for any
            heapq.heappop(order)
            queue = self._queues[key]
            waiter = queue.popleft()
            self._take(key)
            if queue:
                self._queue_turn(key)  # its next waiter goes after the keys that hold as many
            else:
                del self._queues[key]
                del self._turns[key]
            waiter.granted = True
            waiter.event.set()

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
            self._turns.pop(waiter.key, None)
