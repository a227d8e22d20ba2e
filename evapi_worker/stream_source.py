"""Events from Redis: each Kamailio node's stream, read from where this
worker stopped.

With ``EVW_REDIS`` set, a node's timer process appends every event to the
stream ``evw:events:<node>`` (``XADD ... MAXLEN ~``) instead of writing it
to evapi. A stream keeps its entries for every reader: a worker that is
frozen holds up no one, and one that restarts reads on from the last entry
it handled (its position, kept in the state file), losing nothing the
stream still holds. Each entry's payload takes the same path as an evapi
frame (``on_entry`` is the service's).

The reader blocks in ``XREAD`` on a connection of its own; a lost,
silent or refused connection is logged and counted, and reading resumes
from the same positions after a backoff.

An entry that cannot be an event (its payload longer than an evapi frame
may be, or more than a reply may hold) is skipped by its id: counted,
and the position moves past it. It is never read again, by this worker or
after its restart.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final

import trio

from .core.links import Backoff
from .core.netstring import DEFAULT_MAX_FRAME
from .core.resp import Reply, Skipped
from .logs import kv
from .redis_client import Lost, RedisConnection, RedisTarget, Request, stay_connected

__all__ = ["STREAM_PREFIX", "StreamSource", "entries_of", "entry_order", "stream_key"]

log = logging.getLogger("evapi_worker.redis")

STREAM_PREFIX: Final = "evw:events:"
# Entries read at once: a burst is taken a thousand at a time.
_BATCH: Final = 1000
# How long one XREAD waits for entries (the server answers at once when
# some come); short enough that a vanished server is noticed.
_BLOCK_MS: Final = 1000
_FRAMES_PER_CHECKPOINT: Final = 32

EntryHandler = Callable[[str, str, bytes, float], None]
"""Called with (node, entry id, payload, receive time) for every entry."""

SkipHandler = Callable[[str, str, int, float], None]
"""Called with (node, entry id, payload size, receive time) for an entry skipped as too large."""


def stream_key(node: str) -> str:
    """The stream a node's events are appended to (its ``EVW_NODE``)."""
    return STREAM_PREFIX + node


class StreamSource:
    """Reads the nodes' event streams; start it with ``nursery.start``."""

    def __init__(
        self,
        target: RedisTarget,
        nodes: list[str],
        on_entry: EntryHandler,
        *,
        backoff: Backoff | None = None,
        on_connected: Callable[[bool], None] | None = None,
        on_skipped: SkipHandler | None = None,
        on_lost: Callable[[Lost], None] | None = None,
        max_payload: int = DEFAULT_MAX_FRAME,
    ) -> None:
        self.target = target
        self.nodes = nodes
        self._on_entry = on_entry
        self._backoff = backoff
        self._on_connected = on_connected
        self._on_skipped = on_skipped
        self._on_lost = on_lost
        self.max_payload = max_payload
        self.skipped = 0  # entries skipped as too large
        # The last entry handled of each node's stream; "$" until known.
        self.positions: dict[str, str] = {}
        # Where the current connection began to read each stream (logged).
        self.began: dict[str, str] = {}
        self.entries = 0  # entries handed over, over every connection
        self.connects = 0
        self.connected = False
        # Set once every stream has its position: what a node appends from
        # then on is read (the answer to a command sent after it, say).
        self.positioned = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read until cancelled; reports started at once (not when connected)."""
        task_status.started()
        # Entries read are progress: after a working connection, the next
        # one is tried at once.
        await stay_connected(
            self.target, "stream", self._session, lambda: self.entries + self.skipped, self._backoff, self._on_lost
        )

    async def _session(self, redis: RedisConnection) -> None:
        # Connected once Redis answers, not once TCP does: a link that
        # takes connections and forwards nothing is not "connected".
        await redis.call("PING")
        self._set_connected(True)
        try:
            await self._read(redis)
        finally:
            self._set_connected(False)

    def _set_connected(self, up: bool) -> None:
        if up == self.connected:
            return
        self.connected = up
        if up:
            self.connects += 1
            log.info("redis stream connected %s", kv(addr=str(self.target.address), positions=self._positions_text()))
        if self._on_connected is not None:
            self._on_connected(up)

    def _positions_text(self) -> str:
        return ",".join(f"{node}:{self.positions.get(node, '$')}" for node in self.nodes)

    async def _start_positions(self, redis: RedisConnection) -> None:
        """A stream never read yet is read from its current end (its last
        entry's id, so nothing appended while reconnecting is skipped). A
        position past the stream's end (restored from another Redis, or
        one emptied) would wait for entries newer than it and skip every
        one before: the stream is read from its end instead."""
        for node in self.nodes:
            last = await redis.call("XREVRANGE", stream_key(node), "+", "-", "COUNT", 1)
            end = _entry_ids(last)[-1] if _entry_ids(last) else "0-0"
            position = self.positions.get(node)
            if position is None:
                self.positions[node] = end
            elif entry_order(position) > entry_order(end):
                log.warning("redis stream position past its end %s", kv(node=node, position=position, end=end))
                self.positions[node] = end

    async def _read(self, redis: RedisConnection) -> None:
        await self._start_positions(redis)
        self.began = dict(self.positions)
        log.info("redis stream reading %s", kv(positions=self._positions_text()))
        self.positioned.set()
        keys = [stream_key(node) for node in self.nodes]
        node_of = {key.encode(): node for key, node in zip(keys, self.nodes, strict=True)}
        on_entry = self._on_entry
        positions = self.positions

        def read_on() -> Request:
            ids = [positions[node] for node in self.nodes]
            return redis.request(
                "XREAD", "COUNT", _BATCH, "BLOCK", _BLOCK_MS, "STREAMS", *keys, *ids, block=_BLOCK_MS / 1000
            )

        request = read_on()
        while True:
            reply = await request.result()
            batch = []
            first = True  # the next entry is the reply's first
            for key, entries in entries_of(reply):
                if (node := node_of.get(key)) is not None:
                    batch.append((node, _readable(entries, first)))
                first = first and not entries
            for node, entries in batch:
                if entries:
                    positions[node] = entries[-1][0]
            # The next batch is asked for before this one is handled: Redis
            # makes it while the worker works.
            request = read_on()
            now = trio.current_time()
            handled = 0
            for node, entries in batch:
                for entry_id, payload in entries:
                    if isinstance(payload, Skipped):
                        self._skip(node, entry_id, payload.size, now)
                        continue
                    if payload is not None and len(payload) > self.max_payload:
                        self._skip(node, entry_id, len(payload), now)
                        continue
                    self.entries += 1
                    # An entry without the event field (written by something
                    # else) is rejected as the empty frame it is, and counted.
                    on_entry(node, entry_id, payload or b"", now)
                    handled += 1
                    if handled % _FRAMES_PER_CHECKPOINT == 0:
                        # Let the fake calls decided meanwhile start.
                        await trio.lowlevel.checkpoint()

    def _skip(self, node: str, entry_id: str, size: int, now: float) -> None:
        self.skipped += 1
        if self._on_skipped is not None:
            self._on_skipped(node, entry_id, size, now)


def _readable(entries: list[tuple[str, Payload]], first: bool) -> list[tuple[str, Payload]]:
    """The entries of one stream to handle now: up to the first one the reply
    had no room left for (read again by the next read, where it comes
    sooner), unless it was the reply's ``first`` (too large for any reply:
    skipped)."""
    for index, (_, payload) in enumerate(entries):
        if isinstance(payload, Skipped) and not payload.too_long and (index or not first):
            return entries[:index]
    return entries


def _entry_ids(reply: Reply) -> list[str]:
    if not isinstance(reply, list):
        return []
    return [entry[0].decode() for entry in reply if isinstance(entry, list) and entry and isinstance(entry[0], bytes)]


Payload = bytes | Skipped | None


def entries_of(reply: Reply) -> list[tuple[bytes, list[tuple[str, Payload]]]]:
    """XREAD's reply as (stream key, [(entry id, payload)]); an entry with no
    ``e`` field (written by something else) has payload None, one whose
    payload or fields the reply could not hold has a :class:`~.resp.Skipped`."""
    out: list[tuple[bytes, list[tuple[str, Payload]]]] = []
    if not isinstance(reply, list):
        return out
    for stream in reply:
        if not (isinstance(stream, list) and len(stream) == 2 and isinstance(stream[0], bytes)):
            continue
        entries: list[tuple[str, Payload]] = []
        for entry in stream[1] if isinstance(stream[1], list) else []:
            if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], bytes)):
                continue
            fields = entry[1]
            payload: Payload
            if isinstance(fields, Skipped):
                payload = fields
            else:
                pairs = zip(fields[::2], fields[1::2], strict=False) if isinstance(fields, list) else iter(())
                payload = next((v for k, v in pairs if k == b"e" and isinstance(v, bytes | Skipped)), None)
            entries.append((entry[0].decode("ascii", "replace"), payload))
        out.append((stream[0], entries))
    return out


def entry_order(entry_id: str) -> tuple[int, int]:
    """An entry id (``ms-seq``) as what orders it; a malformed one first."""
    ms, _, seq = entry_id.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        return -1, -1
