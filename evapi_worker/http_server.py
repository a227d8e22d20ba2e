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
from functools import partial

import trio
from prometheus_client import CollectorRegistry, generate_latest

from .logs import kv

__all__ = ["serve_http"]

log = logging.getLogger("evapi_worker.http")

_MAX_HEAD = 8192
# The classic text format, which every Prometheus version reads (names here
# are all plain, so the body is the same in newer format versions).
_METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_TIMEOUT = 5.0  # a whole exchange, request and answer
# Connections served at once; more wait to be accepted, so idle or slow
# clients cannot take the descriptors SIPp and evapi need.
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


async def _handle(
    registry: CollectorRegistry,
    health: Health,
    slots: trio.Semaphore,
    timeout: float,
    stream: trio.SocketStream,
) -> None:
    try:
        async with stream:
            with trio.move_on_after(timeout), _quietly():
                await _exchange(registry, health, stream)
    finally:
        slots.release()


class _quietly:
    """A client that went away is no error of ours."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        return kind is not None and issubclass(kind, trio.BrokenResourceError | trio.ClosedResourceError)


async def _exchange(registry: CollectorRegistry, health: Health, stream: trio.SocketStream) -> None:
    head = b""
    while b"\r\n\r\n" not in head and len(head) < _MAX_HEAD:
        data = await stream.receive_some(4096)
        if not data:
            break
        head += data
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
    slots = trio.Semaphore(max_connections)
    handle = partial(_handle, registry, health, slots, timeout)
    try:
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(_accept, listener, slots, handle)
    finally:
        with trio.CancelScope(shield=True):
            for listener in listeners:
                await listener.aclose()


async def _accept(
    listener: trio.abc.Listener[trio.SocketStream],
    slots: trio.Semaphore,
    handle: Callable[[trio.SocketStream], Awaitable[None]],
) -> None:
    """Accept only while a slot is free: the connections beyond it wait in
    the kernel's backlog, where they take none of this process's
    descriptors (SIPp and evapi need them)."""
    warned = -math.inf
    async with trio.open_nursery() as nursery:
        while True:
            await slots.acquire()
            try:
                stream = await listener.accept()
            except OSError as exc:
                slots.release()
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
