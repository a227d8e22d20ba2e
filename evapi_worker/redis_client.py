"""Trio adapter for one connection to a Redis server (resp.py's codec).

Commands are pipelined: :meth:`RedisConnection.call` queues a command's
bytes (one writer task sends them; a caller never waits for the socket)
and waits for its reply, which the reader task hands over in order. A
caller cancelled while it waits leaves its place in the line: its reply,
when it comes, is dropped, and the replies after it still go to theirs.

Every reply has a deadline: the time the server may hold it (an ``XREAD``'s
``BLOCK``) plus ``timeout``. A server that lets one pass is taken for dead
(a half-open link, a dead NAT entry, a frozen host send no FIN or RST):
the connection fails with :attr:`Lost.SILENT` and is made again, in
seconds rather than at TCP's own timeouts, minutes later.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import logging
import math
import random
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import NoReturn

import trio

from .core.links import Backoff
from .core.resp import NEED_DATA, RedisError, Reply, RespDecoder, RespProtocolError, encode_command
from .logs import kv
from .outbox import Outbox, OutboxFull

__all__ = [
    "Lost",
    "RedisAddress",
    "RedisConnection",
    "RedisTarget",
    "RedisUnavailable",
    "Request",
    "open_redis",
    "open_target",
    "stay_connected",
]

log = logging.getLogger("evapi_worker.redis")

_READ_SIZE = 1 << 16


class Lost(enum.StrEnum):
    """Why a connection to Redis ended (the ``why`` label of redis_lost_total)."""

    UNREACHABLE = "unreachable"  # no connection made: refused, no primary, login refused
    SILENT = "silent"  # a reply did not come in time: the link or the server is dead
    CLOSED = "closed"  # closed or reset by the server or the network
    BROKEN = "broken"  # bytes that are not Redis's protocol
    REFUSED = "refused"  # a command the session needs was refused (an error reply)


class RedisUnavailable(Exception):
    """No connection to Redis: refused, lost, or out of sync (``lost`` says which)."""

    def __init__(self, why: str, lost: Lost = Lost.UNREACHABLE) -> None:
        super().__init__(why)
        self.lost = lost


@dataclass(frozen=True, slots=True)
class RedisAddress:
    """Where Redis is: ``redis://[[user]:password@]host[:port][/db]``."""

    host: str
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> RedisAddress:
        """The address a ``redis://`` URL names; ValueError says what is wrong."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "redis":
            raise ValueError(f"{url!r}: the URL must start with redis://")
        if not parts.hostname:
            raise ValueError(f"{url!r} names no host")
        try:
            port = parts.port or 6379
        except ValueError:
            raise ValueError(f"{url!r}: the port is not a number from 1 to 65535") from None
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise ValueError(f"{url!r}: the database ({path!r}) is not a number")
        password = urllib.parse.unquote(parts.password) if parts.password is not None else None
        username = urllib.parse.unquote(parts.username) if parts.username else None
        return cls(parts.hostname, port, int(path or 0), username, password)

    def __str__(self) -> str:
        """Where, without the password (for logs)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"redis://{host}:{self.port}/{self.db}"


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """Which Redis to use: ``address``, or, with ``sentinels``, the primary
    they name ``master`` (reached with ``address``'s database and login)."""

    address: RedisAddress
    sentinels: tuple[tuple[str, int], ...] = ()
    master: str = ""
    # Seconds for a connection to be made and logged in, and for a reply
    # beyond the time the server may hold it: past it, the server is dead.
    timeout: float = 3.0

    async def locate(self) -> RedisAddress:
        """The address of the primary now (asked of each sentinel in turn)."""
        if not self.sentinels:
            return self.address
        timeout = self.timeout
        problems = []
        for host, port in self.sentinels:
            try:
                async with open_redis(RedisAddress(host, port), timeout) as sentinel:
                    with trio.fail_after(timeout):
                        reply = await sentinel.call("SENTINEL", "get-master-addr-by-name", self.master)
            except (RedisUnavailable, RedisError, trio.TooSlowError) as exc:
                problems.append(f"{host}:{port}: {exc or 'no answer'}")
                continue
            if isinstance(reply, list) and len(reply) == 2 and all(isinstance(v, bytes) for v in reply):
                found_host, found_port = (v.decode() if isinstance(v, bytes) else "" for v in reply)
                if found_port.isdigit():
                    return dataclasses.replace(self.address, host=found_host, port=int(found_port))
            problems.append(f"{host}:{port}: knows no primary named {self.master!r}")
        raise RedisUnavailable("no sentinel named the primary: " + "; ".join(problems))


@asynccontextmanager
async def open_target(target: RedisTarget) -> AsyncIterator[RedisConnection]:
    """A connection to the primary ``target`` names (found again at each
    call: after a failover, the new one). A server that is no longer the
    primary (an old one come back as a replica) is not used."""
    address = await target.locate()
    async with open_redis(address, target.timeout) as conn:
        if target.sentinels:
            try:
                role = await conn.call("ROLE")
            except RedisError as exc:
                raise RedisUnavailable(f"{address} did not say its role: {exc}") from None
            if not (isinstance(role, list) and role and role[0] == b"master"):
                raise RedisUnavailable(f"{address} is not the primary")
        yield conn


async def stay_connected(
    target: RedisTarget,
    what: str,
    session: Callable[[RedisConnection], Awaitable[None]],
    progress: Callable[[], int],
    backoff: Backoff | None = None,
    on_lost: Callable[[Lost], None] | None = None,
) -> NoReturn:
    """Run ``session`` on a connection to ``target`` until it ends or the
    connection fails, then connect again: at once (after the shortest
    backoff) when ``progress()`` grew meanwhile, after a growing backoff
    while attempts keep failing. Failures are logged and told to
    ``on_lost``, never raised: ``what`` names the connection in the log
    lines."""
    backoff = backoff or Backoff()
    rng = random.Random()
    attempt = 0
    while True:
        before = progress()
        lost: Lost | None = None
        try:
            async with open_target(target) as conn:
                await session(conn)
        except RedisUnavailable as exc:
            lost = exc.lost
            log.warning("redis %s unavailable %s", what, kv(addr=str(target.address), why=lost, error=str(exc)))
        except RedisError as exc:
            # Refused (a key of another type, a server refusing the command):
            # said, and tried again.
            lost = Lost.REFUSED
            log.error("redis %s refused %s", what, kv(addr=str(target.address), error=str(exc)))
        if lost is not None and on_lost is not None:
            on_lost(lost)
        if progress() > before:
            attempt = 0
        await trio.sleep(backoff.delay(attempt, rng))
        attempt += 1


class Request:
    """A command sent, its reply to come (:meth:`RedisConnection.request`)."""

    __slots__ = ("deadline", "event", "reply")

    def __init__(self, deadline: float) -> None:
        self.event = trio.Event()
        self.reply: Reply | RedisUnavailable | None = None
        self.deadline = deadline  # the connection fails if no reply came by then

    async def result(self) -> Reply:
        """The reply; an error reply raises RedisError, a lost connection
        RedisUnavailable."""
        await self.event.wait()
        reply = self.reply
        if isinstance(reply, RedisUnavailable | RedisError):
            raise reply
        return reply


class RedisConnection:
    """One open connection; made by :func:`open_redis`."""

    def __init__(self, stream: trio.SocketStream, address: RedisAddress, timeout: float = 3.0) -> None:
        self.address = address
        self.timeout = timeout
        self._stream = stream
        self._outbox = Outbox()
        self._waiting: collections.deque[Request] = collections.deque()
        self._last_deadline = -math.inf
        self._lost: str | None = None  # why the connection is gone
        self._lost_kind = Lost.CLOSED
        self._closed = trio.Event()

    @property
    def open(self) -> bool:
        return self._lost is None

    async def call(self, *args: bytes | str | int | float) -> Reply:
        """Send one command and return its reply; an error reply raises
        :class:`~.resp.RedisError`, a lost connection RedisUnavailable."""
        return await self.request(*args).result()

    def request(self, *args: bytes | str | int | float, block: float = 0.0) -> Request:
        """Send one command now; await its reply later (``result()``), so
        that Redis works on it meanwhile. ``block``: seconds the server may
        hold the reply (a blocking read's timeout)."""
        if self._lost is not None:
            raise RedisUnavailable(self._lost, self._lost_kind)
        # Redis answers in order: a reply behind a blocked one waits for it.
        deadline = max(self._last_deadline, trio.current_time() + block + self.timeout)
        pending = Request(deadline)
        try:
            self._outbox.put(encode_command(*args))
        except OutboxFull as exc:
            self._fail(f"Redis does not read: {exc}", Lost.SILENT)
            raise RedisUnavailable(self._lost or "", Lost.SILENT) from None
        except trio.ClosedResourceError:
            raise RedisUnavailable(self._lost or "closed", self._lost_kind) from None
        self._last_deadline = deadline
        self._waiting.append(pending)
        return pending

    async def wait_closed(self) -> None:
        """Return once the connection is gone (lost, or closed)."""
        await self._closed.wait()

    def _fail(self, why: str, kind: Lost = Lost.CLOSED) -> None:
        if self._lost is None:
            self._lost, self._lost_kind = why, kind
        self._closed.set()
        while self._waiting:
            pending = self._waiting.popleft()
            pending.reply = RedisUnavailable(self._lost, self._lost_kind)
            pending.event.set()

    async def _write(self) -> None:
        try:
            await self._outbox.write_to(self._stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._fail(f"write failed: {exc}")

    async def _watch(self) -> None:
        """Fail the connection when the oldest reply is overdue (the others'
        deadlines are later: see :meth:`request`)."""
        tick = min(0.25, self.timeout / 4)
        while self._lost is None:
            await trio.sleep(tick)
            if self._waiting and trio.current_time() > self._waiting[0].deadline:
                self._fail(f"no reply in {self.timeout:g} s past its time: the link or Redis is dead", Lost.SILENT)

    async def _read(self) -> None:
        decoder = RespDecoder()
        try:
            while True:
                data = await self._stream.receive_some(_READ_SIZE)
                if not data:
                    self._fail("closed by Redis")
                    return
                decoder.receive_data(data)
                while (reply := decoder.next_reply()) is not NEED_DATA:
                    if not self._waiting:
                        raise RespProtocolError("a reply no command asked for")
                    pending = self._waiting.popleft()
                    pending.reply = reply
                    pending.event.set()
        except RespProtocolError as exc:
            self._fail(f"not Redis's protocol: {exc}", Lost.BROKEN)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._fail(f"connection lost: {exc}")


@asynccontextmanager
async def open_redis(address: RedisAddress, timeout: float = 5.0) -> AsyncIterator[RedisConnection]:
    """A connection to ``address``, logged in and on its database, for the
    ``async with`` block; RedisUnavailable when there is none in ``timeout``."""
    with trio.move_on_after(timeout) as connecting:
        try:
            stream = await trio.open_tcp_stream(address.host, address.port)
        except OSError as exc:
            raise RedisUnavailable(f"cannot connect to {address}: {exc}") from None
    if connecting.cancelled_caught:
        raise RedisUnavailable(f"no connection to {address} in {timeout:g} s")
    conn = RedisConnection(stream, address, timeout)
    # What the login or the block raises is raised after the nursery, as it
    # is: raised inside, trio would wrap it in an exception group.
    raised: BaseException | None = None
    async with stream, trio.open_nursery() as nursery:
        nursery.start_soon(conn._write)
        nursery.start_soon(conn._read)
        nursery.start_soon(conn._watch)
        try:
            await _log_in(conn, address, timeout)
            yield conn
        except BaseException as exc:  # raised again below, unchanged
            raised = exc
        finally:
            conn._fail("closed")
            nursery.cancel_scope.cancel()
    if raised is not None:
        raise raised


async def _log_in(conn: RedisConnection, address: RedisAddress, timeout: float) -> None:
    try:
        with trio.fail_after(timeout):
            if address.password is not None:
                auth = (address.username, address.password) if address.username else (address.password,)
                await conn.call("AUTH", *auth)
            if address.db:
                await conn.call("SELECT", address.db)
    except trio.TooSlowError:
        raise RedisUnavailable(f"{address} did not answer in {timeout:g} s", Lost.SILENT) from None
    except RedisError as exc:
        raise RedisUnavailable(f"{address} refused the login or database: {exc}") from None
