"""A small Trio HTTP server for ``/metrics`` and ``/healthz``.

Prometheus and health checkers send short GET requests; one request per
connection is all they need, so this speaks just enough HTTP/1.1: it reads
the request head (bounded in size and time), answers, and closes.

No client can make the others wait. The metrics text is made at most a
few times a second and shared by every request meanwhile (built per
request, a flood of requests whose answers nobody reads kept the worker
busy writing text, and a health check waited seconds behind it); every
exchange has a deadline, and at most ``max_connections`` are open.
"""

from __future__ import annotations

import errno
import logging
import math
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import trio
from prometheus_client import CollectorRegistry, generate_latest

from .logs import kv

__all__ = [
    "MetricsPage",
    "accept_forever",
    "respond",
    "serve_http",
]

log = logging.getLogger("evapi_worker.http")

_MAX_HEAD = 8192
# The classic text format, which every Prometheus version reads (names here
# are all plain, so the body is the same in newer format versions).
_METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_TIMEOUT = 5.0  # a whole exchange, request and answer
# How long one metrics text serves every request (Prometheus scrapes every
# few seconds; a counter read a quarter of a second late is no loss).
_METRICS_MAX_AGE = 0.25
# Connections served at once: idle or slow clients cannot take the
# descriptors SIPp and evapi need (see _Clients for who gives way).
_MAX_CONNECTIONS = 32
# Connections accepted in one go before other tasks run.
_ACCEPT_BATCH = 64
_BACKLOG = 4096
_SEND_BUFFER = 1 << 20
_OUT_OF_RESOURCES = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))

Health = Callable[[], tuple[bool, list[str]]]


def _response(status: str, content_type: str, body: bytes) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class MetricsPage:
    """The ``/metrics`` response, made again once it is older than
    ``max_age`` seconds, or than ten times what making it took (so that
    making it takes a tenth of the worker's time at most, however many ask)."""

    def __init__(self, registry: CollectorRegistry, max_age: float = _METRICS_MAX_AGE) -> None:
        self.registry = registry
        self.max_age = max_age
        self.made = 0  # times the text was made
        self._response = b""
        self._fresh_until = -math.inf

    def response(self, now: float) -> bytes:
        if now >= self._fresh_until:
            started = time.perf_counter()
            self._response = _response("200 OK", _METRICS_TYPE, generate_latest(self.registry))
            self.made += 1
            self._fresh_until = now + max(self.max_age, 10 * (time.perf_counter() - started))
        return self._response


def respond(method: str, path: str, metrics: MetricsPage, health: Health, now: float) -> bytes:
    """The response bytes for one request at ``now`` (pure but for the metrics' age)."""
    if method not in ("GET", "HEAD"):
        return _response("405 Method Not Allowed", "text/plain", b"GET only\n")
    path = path.split("?", 1)[0]
    if path == "/metrics":
        reply = metrics.response(now)
    elif path == "/healthz":
        ok, down = health()
        if ok:
            reply = _response("200 OK", "text/plain", b"ok: every Kamailio node is connected\n")
        else:
            text = "not connected: " + ", ".join(down) + "\n"
            reply = _response("503 Service Unavailable", "text/plain", text.encode())
    else:
        reply = _response("404 Not Found", "text/plain", b"try /metrics or /healthz\n")
    if method == "HEAD":
        return reply.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
    return reply


@dataclass(eq=False)
class _Client:
    scope: trio.CancelScope
    idle: bool = True  # no whole request yet


class _Clients:
    """The connections being served, oldest first. When all places are
    taken, a new connection takes the place of the oldest idle one (it has
    sent no request), else of the oldest: a scraper sends its request at
    once and is answered in milliseconds, so clients that connect and send
    nothing, however many, cannot keep it waiting."""

    def __init__(self, places: int) -> None:
        self.places = places
        self._clients: dict[_Client, None] = {}

    def admit(self, client: _Client) -> None:
        if len(self._clients) >= self.places:
            victim = next((c for c in self._clients if c.idle), next(iter(self._clients)))
            victim.scope.cancel()
            self.leave(victim)
        self._clients[client] = None

    def leave(self, client: _Client) -> None:
        self._clients.pop(client, None)


class _quietly:
    """A client that went away is no error of ours."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        return kind is not None and issubclass(kind, trio.BrokenResourceError | trio.ClosedResourceError)


def _head_done(head: bytes) -> bool:
    return b"\r\n\r\n" in head or len(head) >= _MAX_HEAD


class _Server:
    """Answers each connection at once when it can: a client's request is
    there when the connection is accepted, and the answer fits in the
    socket's buffer, so one ``recv`` and one ``send`` serve it, without a
    task (a task per connection cost 230 µs: a flood of requests kept a
    health check seconds in the accept queue). Only a client that is slow
    to ask or to read gets a task, with a place and a deadline."""

    def __init__(self, metrics: MetricsPage, health: Health, places: int, timeout: float) -> None:
        self.metrics = metrics
        self.health = health
        self.clients = _Clients(places)
        self.timeout = timeout
        self.served = 0  # connections answered at once
        self.nursery: trio.Nursery | None = None

    def reply(self, head: bytes) -> bytes:
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return _response("400 Bad Request", "text/plain", b"bad request\n")
        method, path = parts[0].decode("latin-1"), parts[1].decode("latin-1")
        return respond(method, path, self.metrics, self.health, trio.current_time())

    def serve(self, conn: socket.socket) -> None:
        """One accepted connection: answered now, or handed to a task."""
        try:
            conn.setblocking(False)
            head = conn.recv(_MAX_HEAD)
        except BlockingIOError:
            self._hand_over(conn, b"", None)  # nothing asked yet: a task waits for it
            return
        except OSError:
            conn.close()
            return
        if not head:
            conn.close()  # closed before asking
            return
        if not _head_done(head):
            self._hand_over(conn, head, None)
            return
        reply = self.reply(head)
        try:
            sent = conn.send(reply)
        except BlockingIOError:
            sent = 0
        except OSError:
            conn.close()  # gone already
            return
        if sent < len(reply):
            self._hand_over(conn, head, reply[sent:])  # a task writes the rest
            return
        conn.close()
        self.served += 1

    def _hand_over(self, conn: socket.socket, head: bytes, rest: bytes | None) -> None:
        assert self.nursery is not None
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(conn))
        self.nursery.start_soon(self._exchange, stream, head, rest)

    async def _exchange(self, stream: trio.SocketStream, head: bytes, rest: bytes | None) -> None:
        """A slow client: its head read, its answer written, within the deadline."""
        client = _Client(trio.CancelScope(deadline=trio.current_time() + self.timeout))
        client.idle = rest is None
        self.clients.admit(client)
        try:
            async with stream:
                with client.scope, _quietly():
                    if rest is None:
                        while not _head_done(head):
                            data = await stream.receive_some(4096)
                            if not data:
                                break
                            head += data
                        client.idle = False
                        rest = self.reply(head)
                    await stream.send_all(rest)
        finally:
            self.clients.leave(client)


async def serve_http(
    host: str,
    port: int,
    registry: CollectorRegistry,
    health: Health,
    *,
    max_connections: int = _MAX_CONNECTIONS,
    timeout: float = _TIMEOUT,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; reports the bound port when listening."""
    listeners = await _listen(host, port)
    bound: int = listeners[0].getsockname()[1]
    log.info("http listening %s", kv(addr=f"{host}:{bound}", paths="/metrics,/healthz"))
    server = _Server(MetricsPage(registry), health, max_connections, timeout)
    try:
        async with trio.open_nursery() as nursery:
            server.nursery = nursery
            task_status.started(bound)
            for listener in listeners:
                nursery.start_soon(accept_forever, listener, server.serve)
    finally:
        for listener in listeners:
            listener.close()


async def _listen(host: str, port: int) -> list[socket.socket]:
    """Listening sockets on every address ``host`` names (as
    trio.open_tcp_listeners binds them), non-blocking, for a plain accept."""
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    listeners: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in infos:
            sock = socket.socket(family, kind, proto)
            listeners.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            # Room for a whole answer: served by one send (accepted sockets inherit it).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SEND_BUFFER)
            sock.bind(address)
            if port == 0:
                port = sock.getsockname()[1]  # the same port on every address
            sock.listen(_BACKLOG)
            sock.setblocking(False)
    except OSError:
        for sock in listeners:
            sock.close()
        raise
    return listeners


class _Listening(Protocol):
    def fileno(self) -> int: ...
    def accept(self) -> tuple[socket.socket, Any]: ...


async def accept_forever(listener: _Listening, serve: Callable[[socket.socket], None]) -> None:
    """Accept every connection, a batch at a time (then other tasks run),
    and hand each to ``serve``. Out of descriptors or memory is waited out."""
    warned = -math.inf
    while True:
        await trio.lowlevel.wait_readable(listener)
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno not in _OUT_OF_RESOURCES:
                    raise
                # Out of descriptors or memory: an outcome, not an end. Wait
                # for some to be freed; say so now and then.
                now = trio.current_time()
                if now - warned >= 10:
                    log.warning("http accept failed %s", kv(error=exc.strerror or str(exc)))
                    warned = now
                await trio.sleep(0.1)
                break
            serve(conn)
        await trio.lowlevel.checkpoint()
