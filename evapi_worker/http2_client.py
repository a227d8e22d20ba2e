"""A small HTTP/2 client over TLS on Trio and h2: one connection per
origin, every request multiplexed on it.

Push services take thousands of small requests on one long-lived
connection; a general-purpose client spends most of its time in its own
layers there. This one does only that: a request is HEADERS (and DATA),
its response HEADERS and DATA, read by one task per connection that wakes
the request waiting for each stream. A connection that fails fails the
requests on it and is made again by the next one.
"""

from __future__ import annotations

import ssl
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Final

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import trio
from hpack import Encoder, HeaderTuple, NeverIndexedHeaderTuple

__all__ = ["H2Client", "H2Error"]

_STREAMS: Final = 64  # requests in flight per connection at most
_SEEN: Final = 4096  # header values remembered per connection, to index those that repeat


class H2Error(Exception):
    """No answer: the connection failed, the stream was reset, or the time ran out."""


@dataclass(eq=False)
class _Waiting:
    done: trio.Event = field(default_factory=trio.Event)
    status: int = 0
    body: bytearray = field(default_factory=bytearray)
    error: str = ""


@dataclass(eq=False)
class _Connection:
    stream: trio.SSLStream[trio.SocketStream]
    h2: h2.connection.H2Connection
    send_lock: trio.Lock = field(default_factory=trio.Lock)
    waiting: dict[int, _Waiting] = field(default_factory=dict)
    seen: set[tuple[str, str]] = field(default_factory=set)
    dead: bool = False

    def header(self, name: str, value: str) -> HeaderTuple:
        """``name: value``, indexed in HPACK's table from its second use.

        Per-request values (a device token in the path, a push id) would only
        push the repeating ones (the provider token, the topic) out of the
        table; a value seen before is worth an entry. The table lives on
        this one TLS connection to the push service and HPACK matches whole
        values, so indexing the provider token gives nothing away (h2 would
        send it literally, Huffman-coded in Python, on every request).
        """
        if not (value.isascii() and value.isprintable()):
            raise H2Error(f"header {name} is not printable ASCII")
        if (name, value) in self.seen:
            return HeaderTuple(name, value)
        if len(self.seen) >= _SEEN:
            self.seen.clear()
        self.seen.add((name, value))
        return NeverIndexedHeaderTuple(name, value)


class _PlainEncoder(Encoder):
    """HPACK without Huffman coding: done in Python it costs a push more
    time than the few bytes it saves take on the wire."""

    def encode(self, headers: Any, huffman: bool = False) -> bytes:
        return super().encode(headers, huffman=huffman)


class H2Client:
    """Requests to one ``https://host[:port]`` origin."""

    def __init__(self, base_url: str, tls: ssl.SSLContext, timeout: float) -> None:
        url = urllib.parse.urlsplit(base_url)
        if url.scheme != "https" or not url.hostname:
            raise ValueError(f"{base_url!r} is not an https:// URL")
        self.host, self.port = url.hostname, url.port or 443
        self.authority = url.netloc
        self.tls = tls
        self.timeout = timeout
        self._conn: _Connection | None = None
        self._connecting = trio.Lock()
        self._slots = trio.CapacityLimiter(_STREAMS)

    async def request(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        """The status and body of the answer; :class:`H2Error` without one."""
        async with self._slots:
            with trio.move_on_after(self.timeout) as scope:
                conn = await self._connection()
                waiting = await self._send(conn, method, path, headers, body)
                await waiting.done.wait()
            if scope.cancelled_caught:
                raise H2Error(f"no answer in {self.timeout:g} s")
            if waiting.error:
                raise H2Error(waiting.error)
            return waiting.status, bytes(waiting.body)

    async def _connection(self) -> _Connection:
        async with self._connecting:
            if self._conn is not None and not self._conn.dead:
                return self._conn
            try:
                stream = await trio.open_ssl_over_tcp_stream(
                    self.host, self.port, ssl_context=self.tls, https_compatible=True
                )
                await stream.do_handshake()
            except (OSError, trio.BrokenResourceError, ssl.SSLError) as exc:
                raise H2Error(f"cannot connect to {self.authority}: {exc}") from None
            if stream.selected_alpn_protocol() != "h2":
                await stream.aclose()
                raise H2Error(f"{self.authority} does not speak HTTP/2")
            # Outbound headers are built here from validated values (see
            # _Connection.header); h2's own checks of them cost a fifth of a push.
            config = h2.config.H2Configuration(
                client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False
            )
            conn = _Connection(stream, h2.connection.H2Connection(config))
            conn.h2.encoder = _PlainEncoder()
            conn.h2.initiate_connection()
            await self._flush(conn)
            # The reader outlives the request that opened the connection.
            trio.lowlevel.spawn_system_task(self._read, conn)
            self._conn = conn
            return conn

    async def _send(self, conn: _Connection, method: str, path: str, headers: dict[str, str], body: bytes) -> _Waiting:
        waiting = _Waiting()
        try:
            request = [conn.header(":method", method), conn.header(":scheme", "https")]
            request += [conn.header(":authority", self.authority), conn.header(":path", path)]
            request += [conn.header(name.lower(), value) for name, value in headers.items()]
            if body:
                request.append(conn.header("content-length", str(len(body))))
            stream_id = conn.h2.get_next_available_stream_id()
            conn.h2.send_headers(stream_id, request, end_stream=not body)
            if body:
                conn.h2.send_data(stream_id, body, end_stream=True)
        except h2.exceptions.H2Error as exc:
            raise H2Error(f"cannot send: {exc!r}") from None
        conn.waiting[stream_id] = waiting
        await self._flush(conn)
        return waiting

    async def _flush(self, conn: _Connection) -> None:
        async with conn.send_lock:
            data = conn.h2.data_to_send()
            if not data:
                return
            try:
                await conn.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._fail(conn, f"connection lost: {exc!r}")
                raise H2Error(f"connection lost: {exc!r}") from None

    async def _read(self, conn: _Connection) -> None:
        """Read the connection until it ends; wake each request as its answer completes."""
        why = "connection closed"
        try:
            while not conn.dead:
                data = await conn.stream.receive_some(65536)
                if not data:
                    break
                for event in conn.h2.receive_data(data):
                    self._on_event(conn, event)
                await self._flush(conn)
        except (trio.BrokenResourceError, trio.ClosedResourceError, H2Error, h2.exceptions.H2Error) as exc:
            why = f"connection lost: {exc!r}"
        except Exception as exc:  # a system task must not raise: the error boundary of a connection
            why = f"connection failed: {exc!r}"
        finally:
            self._fail(conn, why)
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(conn.stream)

    def _on_event(self, conn: _Connection, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            waiting = conn.waiting.get(event.stream_id or 0)
            if waiting is not None:
                for name, value in event.headers or []:
                    if name == b":status":
                        waiting.status = int(value)
        elif isinstance(event, h2.events.DataReceived):
            waiting = conn.waiting.get(event.stream_id or 0)
            if waiting is not None:
                waiting.body += event.data or b""
            conn.h2.acknowledge_received_data(event.flow_controlled_length or 0, event.stream_id or 0)
        elif isinstance(event, h2.events.StreamEnded):
            waiting = conn.waiting.pop(event.stream_id or 0, None)
            if waiting is not None:
                waiting.done.set()
        elif isinstance(event, h2.events.StreamReset):
            waiting = conn.waiting.pop(event.stream_id or 0, None)
            if waiting is not None:
                waiting.error = f"stream reset ({event.error_code!r})"
                waiting.done.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            # GOAWAY: no new requests here; those already answered are done.
            self._fail(conn, f"connection ended by the server ({event.error_code!r})")

    def _fail(self, conn: _Connection, why: str) -> None:
        conn.dead = True
        for waiting in conn.waiting.values():
            waiting.error = why
            waiting.done.set()
        conn.waiting.clear()

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._fail(conn, "client closed")
            await trio.aclose_forcefully(conn.stream)
