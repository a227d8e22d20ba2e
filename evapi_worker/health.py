"""Is each Kamailio node alive? Pings on every connection decide.

A TCP connection alone proves nothing: a frozen Kamailio (SIGSTOP, a VM
pause) or a half-open connection still accepts it. A node is up once it
answered a ping on its current connection, and down when a ping goes
unanswered, when the connection drops, or before the first answer; a node
found down has its connection dropped and made again. Each answer also
measures the node's clock (``on_ping``; see core/clocks.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import trio

from .core.commands import Ping
from .core.links import CommandFailed, CommandFailure
from .evapi_client import ConnectionState, EvapiConnection, SendCommand
from .logs import kv
from .metrics import Metrics

__all__ = ["Liveness", "OnPing"]

OnPing = Callable[[str, float, float, float], None]
"""A node answered a ping: (node, sent, received, the node's stamp), on trio's clock."""

# A ping that failed so: the node stopped answering on this connection.
_DOWN = (CommandFailure.TIMEOUT, CommandFailure.DISCONNECTED)

log = logging.getLogger("evapi_worker.health")


class Liveness:
    """Liveness of every node: :meth:`watch` per connection, :meth:`on_state`
    from the connections, :meth:`healthy` for ``/healthz``."""

    def __init__(
        self,
        connections: Mapping[str, EvapiConnection],
        send_command: SendCommand,
        metrics: Metrics,
        ping_interval: float,
        on_ping: OnPing | None = None,
        answers_read: trio.Event | None = None,
    ) -> None:
        self.connections = connections
        self.on_ping = on_ping
        # Set once the pings' answers can be read (with [redis] they come
        # through the streams: a ping sent before the reader has its
        # position could be answered before it, unread).
        self.answers_read = answers_read
        self.send_command = send_command
        self.metrics = metrics
        self.ping_interval = ping_interval  # 0: no pings, up follows the connection
        self._alive: dict[str, bool] = {}
        for name in connections:
            metrics.kamailio_up.labels(name).set(0)

    async def watch(self, conn: EvapiConnection) -> None:
        """Ping ``conn`` every ``ping_interval`` while it is connected, and
        at once after each new connection."""
        name = conn.node.name
        if self.ping_interval <= 0:
            return
        if self.answers_read is not None:
            await self.answers_read.wait()
        while True:
            await conn.wait_connected()
            generation = conn.connects
            sent = trio.current_time()
            try:
                answer = await self.send_command(name, Ping())
            except CommandFailed as exc:
                if exc.reason is CommandFailure.REFUSED:
                    self.set_alive(name, True)  # it answered, if only "no"
                elif exc.reason is CommandFailure.TIMEOUT and conn.heard_since(sent):
                    continue  # late, but the node talks: ask again
                elif exc.reason in _DOWN and conn.connects == generation:
                    log.warning("node not answering %s", kv(node=name, reason=exc.reason, detail=str(exc)))
                    self.set_alive(name, False)
                    conn.abort()
                    await conn.wait_disconnected()
                    continue
            else:
                self.set_alive(name, True)
                if self.on_ping is not None:
                    self.on_ping(name, sent, trio.current_time(), answer.ts)
            with trio.move_on_after(self.ping_interval):
                await conn.wait_disconnected()

    def on_state(self, node: str, state: ConnectionState) -> None:
        """A connection's state changed."""
        up = state is ConnectionState.CONNECTED
        if not up:
            self.set_alive(node, False)
        elif self.ping_interval <= 0:
            self.set_alive(node, True)
        if up and self.connections[node].connects > 1:
            self.metrics.reconnects.labels(node).inc()

    def set_alive(self, node: str, alive: bool) -> None:
        if alive != self._alive.get(node, False):
            log.info("node %s %s", "up" if alive else "down", kv(node=node))
        self._alive[node] = alive
        self.metrics.kamailio_up.labels(node).set(1 if alive else 0)

    def healthy(self) -> tuple[bool, list[str]]:
        """True while every node is connected and answering; else the names
        of those that are not."""
        down = [name for name, conn in self.connections.items() if not (conn.connected and self._alive.get(name))]
        return not down, down
