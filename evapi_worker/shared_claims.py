"""Claims on a fake call shared by every node and every worker, in Redis.

A node's claim (the pin's) makes one worker of those that heard a REGISTER
send its fake call; a device registered on two nodes at once is heard on
both, and could get one fake call per node. With ``[redis]``, a worker
first claims the (Call-ID, device) pair in Redis with ``SET key holder NX
PX ttl``: atomic across every node and worker, so one fake call in all.
The node's claim follows as before (it still settles a retry after a
crash).

A worker restarted after a crash tries its fake calls in doubt again: the
claim it made before the crash names it (its holder id is stable while its
state file is), so it is its own to retry. Redis out of reach is not an
end: the node's claim alone decides then (at most one fake call per node),
and the claim is counted ``unavailable``.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from typing import Final

import trio

from .core.claims import claim_key
from .core.links import Backoff
from .core.resp import RedisError
from .logs import kv
from .redis_client import Lost, RedisConnection, RedisTarget, RedisUnavailable, stay_connected

__all__ = ["CLAIM_PREFIX", "ClaimResult", "SharedClaims"]

log = logging.getLogger("evapi_worker.redis")

CLAIM_PREFIX: Final = "evw:claim:"
# A claim's answer is worth this long at most: past it, the node's claim decides.
_ANSWER_WITHIN: Final = 1.0
# While no claim is made, a PING this often finds a dead link before a
# claim waits on it.
_PING_EVERY: Final = 5.0


class ClaimResult(enum.StrEnum):
    """How a shared claim went (the ``result`` label of shared_claims_total)."""

    WON = "won"  # this worker sends the fake call
    TAKEN = "taken"  # another worker (on this node or another) sends it
    UNAVAILABLE = "unavailable"  # Redis out of reach: the node's claim decides


class SharedClaims:
    """Claims in Redis over one connection, kept up; ``nursery.start(run)``."""

    def __init__(
        self,
        target: RedisTarget,
        holder: str,
        *,
        backoff: Backoff | None = None,
        on_lost: Callable[[Lost], None] | None = None,
    ) -> None:
        self.target = target
        self.holder = holder  # names this worker (stable across its restarts)
        self.connects = 0
        self._backoff = backoff
        self._on_lost = on_lost
        self._conn: RedisConnection | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        # A connection made is progress: the next one is tried at once.
        await stay_connected(self.target, "claims", self._hold, lambda: self.connects, self._backoff, self._on_lost)

    async def _hold(self, conn: RedisConnection) -> None:
        """Claim over ``conn`` until it closes (a dead link is found by the
        next claim's deadline, or by a PING while none is made)."""
        await conn.call("PING")
        self._conn = conn
        self.connects += 1
        try:
            while True:
                with trio.move_on_after(_PING_EVERY):
                    await conn.wait_closed()
                    return
                await conn.call("PING")
        finally:
            self._conn = None

    async def claim(self, call_id: str, aor: str, device: str, ttl: float, *, retry: bool = False) -> ClaimResult:
        """Claim the fake call of ``device`` for the call (``call_id``,
        ``aor``) for ``ttl`` seconds; ``retry``: this worker may have
        claimed it before a crash."""
        conn = self._conn
        if conn is None:
            return ClaimResult.UNAVAILABLE
        key = CLAIM_PREFIX + claim_key(call_id, aor, device)
        try:
            with trio.fail_after(_ANSWER_WITHIN):
                answer = await conn.call("SET", key, self.holder, "NX", "PX", max(1, int(ttl * 1000)))
                if answer == "OK":
                    return ClaimResult.WON
                if retry and await conn.call("GET", key) == self.holder.encode():
                    return ClaimResult.WON  # its own claim, from before the crash
        except (RedisUnavailable, RedisError, trio.TooSlowError) as exc:
            log.warning("redis claim failed %s", kv(call_id=call_id, device=device, error=str(exc) or "no answer"))
            return ClaimResult.UNAVAILABLE
        return ClaimResult.TAKEN
