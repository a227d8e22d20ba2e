"""The outgoing bytes of one stream, written by one task.

Senders never wait: :meth:`Outbox.put` appends to a buffer and wakes the
writer, which sends everything queued so far in one ``send_all``. A lock
around ``send_all`` instead hands the stream from sender to sender one
scheduling round at a time (the holder yields inside ``send_all``): in a
burst of a thousand fake calls, the last pin waited behind hundreds of those
rounds (half a second on two cores, bench/burst.py), and each frame cost a
system call of its own.
"""

from __future__ import annotations

import trio

__all__ = ["Outbox", "OutboxFull"]

DEFAULT_LIMIT = 4 * 1024 * 1024


class OutboxFull(Exception):
    """More bytes wait than the outbox holds: the peer does not read."""


class Outbox:
    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self.limit = limit
        self.closed = False
        self.sends = 0  # send_all calls made, each with all that was queued
        self._pending = bytearray()
        self._wake = trio.Event()

    @property
    def queued(self) -> int:
        """Bytes put and not yet handed to the stream."""
        return len(self._pending)

    def put(self, data: bytes) -> None:
        """Queue ``data`` after everything put before; never waits.

        Raises :class:`trio.ClosedResourceError` once the writer has
        stopped, :class:`OutboxFull` past :attr:`limit` bytes waiting (one
        message larger than the limit is taken when nothing waits).
        """
        if self.closed:
            raise trio.ClosedResourceError("the stream's writer has stopped")
        if self._pending and len(self._pending) + len(data) > self.limit:
            raise OutboxFull(f"{len(self._pending)} bytes already wait to be sent")
        self._pending += data
        self._wake.set()

    async def write_to(self, stream: trio.abc.SendStream) -> None:
        """Send what is put, in order, until cancelled or a send fails
        (which raises); the outbox is closed when this returns."""
        try:
            while True:
                if not self._pending:
                    self._wake = trio.Event()
                    await self._wake.wait()
                    continue
                data = bytes(self._pending)
                self._pending.clear()
                self.sends += 1
                await stream.send_all(data)
        finally:
            self.closed = True
