"""What happens to the engine's decisions: counted, logged, shown to
listeners, and, for an :class:`~.engine.Act`, started as a task.

Actions start as tasks straight from :meth:`Dispatcher.dispatch` (no queue
hop: that would add a scheduling round to every decision's latency); at
most ``limit`` of them exist at once, the rest are dropped and counted.
An action is journaled when it truly begins, by the action runner (see
persistence.py): one that was still waiting when the worker died is
decided again after the restore and begins then.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import trio

from .core.engine import Act, Decision, Reason
from .core.outcomes import Outcome
from .evapi_client import EvapiConnection
from .fake_calls import ActionRunner, count_outcome
from .logs import kv
from .metrics import Metrics

__all__ = ["Dispatcher"]

log = logging.getLogger("evapi_worker.dispatch")
decisions_log = logging.getLogger("evapi_worker.decision")


class Dispatcher:
    def __init__(
        self,
        actions: ActionRunner,
        connections: Mapping[str, EvapiConnection],
        metrics: Metrics,
        limit: int,
    ) -> None:
        self.actions = actions
        self.connections = connections
        self.metrics = metrics
        self.limit = limit
        # Observers of every decision (replay output, tests); called synchronously.
        self.listeners: list[Callable[[Decision], None]] = []
        self._nursery: trio.Nursery | None = None
        self._open = 0
        self._stopping = False

    def open(self, nursery: trio.Nursery) -> None:
        """Start actions in ``nursery`` from now on."""
        self._nursery = nursery

    def close(self) -> None:
        """Start no more actions (the worker stops): each decided from now
        on is deferred, for the saved state."""
        self._stopping = True

    def dispatch(self, decisions: Sequence[Decision], received: float) -> None:
        """Count, log and act on decisions made for events received at ``received``."""
        m = self.metrics
        for d in decisions:
            m.decisions.labels(d.action.value, d.reason).inc()
            if decisions_log.isEnabledFor(logging.INFO):
                decisions_log.info(
                    "decision %s",
                    kv(
                        ts=d.ts,
                        node=d.node,
                        call_id=d.call_id,
                        account=d.aor,
                        device=d.device,
                        action=d.action.value,
                        reason=d.reason,
                        since_start=d.since_start,
                        since_end=d.since_end,
                    ),
                )
            for listener in self.listeners:
                listener(d)
            if d.reason is not Reason.DUPLICATE:
                m.wakeup_delay.observe(max(0.0, d.since_start))
                if d.since_end is not None:
                    m.late_after_end.observe(max(0.0, d.since_end))
            if not isinstance(d, Act):
                continue
            m.late_registrations.labels(d.call.end.value).inc()
            if self._stopping or self._nursery is None:
                # Decided during the stop's grace: the saved state keeps it.
                self.actions.defer(d)
            elif self._open < self.limit:
                self.start(d, received)
            else:
                m.dispatch_dropped.inc()
                count_outcome(m, d, Outcome.OVERDUE)
                log.warning("action dropped %s", kv(call_id=d.call_id, device=d.device, reason="action queue full"))

    def resume(self, saved: Sequence[Act], in_doubt: Sequence[Act] = ()) -> None:
        """Begin the actions a stopped or crashed worker decided and never
        began, and retry those it began and could not finish, those still
        in time."""
        now = trio.current_time()
        for act, retry in [*((a, False) for a in saved), *((a, True) for a in in_doubt)]:
            if act.deadline > now:
                self.start(act, now, resumed=True, retry=retry)
            elif not retry:
                count_outcome(self.metrics, act, Outcome.OVERDUE)
                log.warning("saved action overdue %s", kv(call_id=act.call_id, device=act.device))

    def start(self, act: Act, received: float, *, resumed: bool = False, retry: bool = False) -> None:
        assert self._nursery is not None
        self._open += 1
        self._nursery.start_soon(self._run, act, received, resumed, retry)

    async def _run(self, act: Act, received: float, resumed: bool, retry: bool) -> None:
        try:
            conn = self.connections.get(act.node)
            if resumed and conn is not None:
                # Saved by a stopped worker: its node is being connected to.
                with trio.move_on_at(act.deadline):
                    await conn.wait_connected()
            await self.actions.run(act, received, retry=retry)
        finally:
            self._open -= 1
