"""The clock of a batch benchmark: from the first event handed to the
service to the last, with the actions counted instead of run."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import trio

from evapi_worker.core.engine import Act
from evapi_worker.core.outcomes import Outcome


class BatchClock:
    """Wraps the service's event handler; set ``done`` after ``events`` calls."""

    def __init__(self, events: int) -> None:
        self.events = events
        self.seen = 0
        self.first = self.last = 0.0
        self.actions = 0
        self.done = trio.Event()

    @property
    def elapsed(self) -> float:
        return self.last - self.first

    def timed(self, handler: Callable[..., None]) -> Callable[..., None]:
        """``handler``, with the first and last of ``events`` calls timed."""

        def timed(*args: Any) -> None:
            if self.seen == 0:
                self.first = time.perf_counter()
            handler(*args)
            self.seen += 1
            if self.seen == self.events:
                self.last = time.perf_counter()
                self.done.set()

        return timed

    async def count_action(self, decision: Act, received: float, *, retry: bool = False) -> Outcome:
        """Stands in for ``ActionRunner.run``: counts, starts nothing."""
        self.actions += 1
        return Outcome.COMPLETED
