"""A small Trio HTTP server for ``/metrics`` and ``/healthz``.

Prometheus and health checkers send short GET requests; one request per
connection is all they need, so this speaks just enough HTTP/1.1: it reads
the request head (bounded in size and time), answers, and closes.
"""

from __future__ import annotations

import errno
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial

import trio
from prometheus_client import CollectorRegistry, generate_latest

from .logs import kv

__all__ = [
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
# Connections served at once: idle or slow clients cannot take the
# descriptors SIPp and evapi need (see _Clients for who gives way).
_MAX_CONNECTIONS = 32
_OUT_OF_RESOURCES = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))

Health = Callable[[], tuple[bool, list[str]]]


def _response(status: str, content_type: str, body: bytes) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


def respond(method: str, path: str, registry: CollectorRegistry, health: Health) -> bytes:
    """The response bytes for one request (pure, for tests)."""
    if method not in ("GET", "HEAD"):
        return _response("405 Method Not Allowed", "text/plain", b"GET only\n")
    path = path.split("?", 1)[0]
    if path == "/metrics":
        body = generate_latest(registry)
        reply = _response("200 OK", _METRICS_TYPE, body)
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


async def _handle(
    registry: CollectorRegistry,
    health: Health,
    clients: _Clients,
    timeout: float,
    stream: trio.SocketStream,
) -> None:
    client = _Client(trio.CancelScope(deadline=trio.current_time() + timeout))
    clients.admit(client)
    try:
        async with stream:
            with client.scope, _quietly():
                await _exchange(registry, health, stream, client)
    finally:
        clients.leave(client)


class _quietly:
    """A client that went away is no error of ours."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        return kind is not None and issubclass(kind, trio.BrokenResourceError | trio.ClosedResourceError)


async def _exchange(registry: CollectorRegistry, health: Health, stream: trio.SocketStream, client: _Client) -> None:
    head = b""
    while b"\r\n\r\n" not in head and len(head) < _MAX_HEAD:
        data = await stream.receive_some(4096)
        if not data:
            break
        head += data
    client.idle = False
    parts = head.split(b"\r\n", 1)[0].split()
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
        reply = _response("400 Bad Request", "text/plain", b"bad request\n")
    else:
        reply = respond(parts[0].decode("latin-1"), parts[1].decode("latin-1"), registry, health)
    await stream.send_all(reply)


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
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound: int = listeners[0].socket.getsockname()[1]
    log.info("http listening %s", kv(addr=f"{host}:{bound}", paths="/metrics,/healthz"))
    task_status.started(bound)
    handle = partial(_handle, registry, health, _Clients(max_connections), timeout)
    try:
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(accept_forever, listener, handle)
    finally:
        with trio.CancelScope(shield=True):
            for listener in listeners:
                await listener.aclose()


async def accept_forever(
    listener: trio.abc.Listener[trio.SocketStream],
    handle: Callable[[trio.SocketStream], Awaitable[None]],
) -> None:
    """Accept every connection (each takes a place from an older one when
    all are taken: at most ``max_connections`` descriptors stay open, which
    SIPp and evapi need)."""
    warned = -math.inf
    async with trio.open_nursery() as nursery:
        while True:
            try:
                stream = await listener.accept()
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
                continue
            nursery.start_soon(handle, stream)
