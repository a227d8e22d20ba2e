"""Trio adapter for one Kamailio node's evapi socket.

It connects, reconnects with capped exponential backoff and jitter, turns
the byte stream into frames with the sans-I/O decoder and hands each frame
to a synchronous callback. The read loop awaits nothing but the socket:
Kamailio writes to evapi clients with blocking sockets, so a client that
stops reading stalls Kamailio itself.

Commands get their id here, go out as one netstring each through the
connection's outbox (one writer; a sender never waits for the socket) and
wait for Kamailio's ``cmd_result`` with the same id.
"""

from __future__ import annotations

import enum
import fcntl
import itertools
import logging
import math
import os
import random
import secrets
import socket
import struct
import termios
from collections.abc import Awaitable, Callable

import msgspec
import trio

from .core.clocks import PAUSED
from .core.commands import Command, CommandTooLarge, Hello, command_name, encode_command
from .core.events import CommandResult
from .core.links import Backoff, CommandFailed, CommandFailure, NodeAddress
from .core.netstring import DEFAULT_MAX_FRAME, FramingError, FramingFault, NeedData, NetstringDecoder, OversizedFrame
from .core.sip_values import bracketed
from .logs import kv
from .outbox import Outbox, OutboxFull

__all__ = [
    "BadFrameHandler",
    "ConnectionState",
    "EvapiConnection",
    "SendCommand",
]

log = logging.getLogger("evapi_worker.evapi")

SendCommand = Callable[[str, Command], Awaitable[CommandResult]]
"""Send a command to the named node and wait for its acknowledgement."""

_FRAMES_PER_CHECKPOINT = 32
_READ_SIZE = 1 << 16
# While events keep coming, reads are at least this far apart: one read then
# takes what arrived meanwhile instead of one wake-up per event, for at most
# this much added latency; an idle connection is read the moment data comes.
_COALESCE = 0.0001
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)
# Acknowledgements are never shed: a lost ack fails a command, and a lost
# ping answer would drop the connection.
_ACK_MARK = b'"cmd_result"'
# A command's deadline that the worker slept through is given again this
# many times at most: a loop starved without end must not wait without end.
_REGRANTS = 3


class ConnectionState(enum.Enum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    WAITING = "waiting"  # backing off before the next attempt
    STOPPED = "stopped"


FrameHandler = Callable[[str, bytes, float], None]
"""Called with (node name, payload, receive time) for every frame."""

BadFrameHandler = Callable[[str, FramingFault, str], None]
"""Called with (node name, what was wrong, detail) for bytes that are not a
frame: an oversized frame (skipped) or lost framing (the connection is
dropped and made again)."""


class _Waiter:
    __slots__ = ("event", "result")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.result: CommandResult | CommandFailed | None = None


class EvapiConnection:
    """A self-healing connection to one node. Start it with ``nursery.start``."""

    def __init__(
        self,
        node: NodeAddress,
        on_frame: FrameHandler,
        *,
        backoff: Backoff | None = None,
        max_frame: int = DEFAULT_MAX_FRAME,
        rng: random.Random | None = None,
        on_state: Callable[[str, ConnectionState], None] | None = None,
        on_bad_frame: BadFrameHandler | None = None,
        on_shed: FrameHandler | None = None,
        shed_above: int = 0,
        shed_below: int = 0,
    ) -> None:
        self.node = node
        self._on_frame = on_frame
        self._backoff = backoff or Backoff()
        self._max_frame = max_frame
        self._rng = rng or random.Random()
        self._on_state = on_state
        self._on_bad_frame = on_bad_frame
        # Overload: past shed_above bytes waiting in the socket, frames other
        # than acknowledgements go to on_shed (counted, not decided) until
        # fewer than shed_below wait, so Kamailio's writes never back up.
        self._on_shed = on_shed
        self._shed_above = shed_above if on_shed is not None else 0
        self._shed_below = shed_below
        self.shedding = False
        self.last_data = -math.inf  # trio time of the last bytes read from the node
        self.state = ConnectionState.STOPPED
        self.connects = 0
        self.frames = 0  # frames received, over every connection
        self._stream: trio.SocketStream | None = None
        self._connected = trio.Event()
        self._disconnected = trio.Event()
        self._disconnected.set()  # no connection yet
        self._aborted = False
        self._outbox: Outbox | None = None  # the current connection's
        self._waiters: dict[str, _Waiter] = {}
        self._ids = itertools.count(1)
        # Ids start with a per-process prefix, so an acknowledgement meant
        # for a previous worker instance never matches.
        self._id_prefix = secrets.token_hex(3)

    @property
    def connected(self) -> bool:
        return self.state is ConnectionState.CONNECTED

    async def wait_connected(self) -> None:
        """Return once a connection is up (at once if one is)."""
        await self._connected.wait()

    async def wait_disconnected(self) -> None:
        """Return once the current connection is gone (at once if none is up)."""
        await self._disconnected.wait()

    def abort(self) -> None:
        """Drop the current connection (the node stopped answering); the
        run loop reconnects after its backoff."""
        stream = self._stream
        if stream is not None:
            self._aborted = True
            stream.socket.close()

    def next_id(self) -> str:
        return f"{self._id_prefix}-{next(self._ids)}"

    def _set_state(self, state: ConnectionState) -> None:
        self.state = state
        if self._on_state is not None:
            self._on_state(self.node.name, state)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect and read forever; reports started at once (not when connected)."""
        task_status.started()
        attempt = 0
        try:
            while True:
                self._set_state(ConnectionState.CONNECTING)
                try:
                    stream = await trio.open_tcp_stream(self.node.evapi_host, self.node.evapi_port)
                except OSError as exc:
                    where = f"{bracketed(self.node.evapi_host)}:{self.node.evapi_port}"
                    log.warning(
                        "evapi connect failed %s",
                        kv(node=self.node.name, addr=where, error=str(exc),
                           hint=f"is Kamailio running and is evapi listening on {where}?"),
                    )  # fmt: skip
                else:
                    _keepalive(stream)
                    up_since = trio.current_time()
                    frames = self.frames
                    await self._serve(stream)
                    if self.frames > frames or trio.current_time() - up_since >= self._backoff.cap:
                        # It was a working connection: events sent before the
                        # next one are lost, so retry at once (~0.1 s), and
                        # back off only while attempts keep failing.
                        attempt = 0
                self._set_state(ConnectionState.WAITING)
                await trio.sleep(self._backoff.delay(attempt, self._rng))
                attempt += 1
        finally:
            self._fail_waiters(CommandFailure.STOPPED, "connection stopped")
            self._set_state(ConnectionState.STOPPED)

    async def _serve(self, stream: trio.SocketStream) -> None:
        self.connects += 1
        self._stream = stream
        self._aborted = False
        self._disconnected = trio.Event()
        self._set_state(ConnectionState.CONNECTED)
        self._connected.set()
        where = f"{bracketed(self.node.evapi_host)}:{self.node.evapi_port}"
        log.info("evapi connected %s", kv(node=self.node.name, addr=where))
        outbox = self._outbox = Outbox()
        # First on the connection: the node sends events only to those that
        # said hello. Its answer is waited for by no one (a ping follows).
        outbox.put(encode_command(Hello(id=self.next_id())))
        try:
            async with stream, trio.open_nursery() as nursery:
                nursery.start_soon(self._write, stream, outbox)
                await self._read(stream)
                nursery.cancel_scope.cancel()
        finally:
            self._stream = self._outbox = None
            self._connected = trio.Event()
            self._disconnected.set()
            self._fail_waiters(CommandFailure.DISCONNECTED, "connection closed before the acknowledgement")

    async def _write(self, stream: trio.SocketStream, outbox: Outbox) -> None:
        """Send the commands as they are put; a failed send drops the
        connection (the reader sees it and reconnects)."""
        try:
            await outbox.write_to(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            if not self._aborted:
                log.warning("evapi send failed %s", kv(node=self.node.name, error=str(exc)))
            stream.socket.close()

    async def _read(self, stream: trio.SocketStream) -> None:
        decoder = NetstringDecoder(self._max_frame)
        name = self.node.name
        try:
            sock = stream.socket
            unyielded = 0  # frames handled since this task last let others run
            last_read = -math.inf
            while True:
                # Read the socket directly and wait only when it is
                # empty: Kamailio writes each event on its own, and the
                # stream's receive_some (a failed read, the wait, the
                # read again, with its checkpoints) costs more per event
                # than handling the event (bench/ingest_vs_kamailio.py).
                try:
                    fd = sock.fileno()  # -1 once closed (abort): never a reused number
                    data = os.read(fd, _READ_SIZE)
                except BlockingIOError:
                    unyielded = 0
                    try:
                        pause = last_read + _COALESCE - trio.current_time()
                        if pause > 0:
                            # Busy: let the next events gather for a
                            # moment, and take them in one read.
                            await trio.sleep(pause)
                            last_read = -math.inf
                            continue
                        await trio.lowlevel.wait_readable(sock)
                    except (trio.ClosedResourceError, OSError) as exc:
                        self._log_lost(exc)
                        return
                    continue
                except OSError as exc:
                    self._log_lost(exc)
                    return
                if not data:
                    if decoder.in_frame:
                        log.warning("evapi closed mid-frame %s", kv(node=name, buffered=decoder.buffered))
                    else:
                        log.warning("evapi closed by Kamailio %s", kv(node=name))
                    return
                now = trio.current_time()
                self.last_data = last_read = now
                if _QUICKACK is not None:
                    # ACK at once, every read: Kamailio writes each event
                    # on its own, and with Nagle on its side a delayed ACK
                    # from us (the kernel's default once the connection
                    # also carries our commands) holds events back.
                    sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
                decoder.receive_data(data)
                if self._shed_above:
                    self._check_overload(stream)
                shedding = self.shedding
                unyielded += 1  # a read counts, even one without a whole frame
                while True:
                    frame = decoder.next_frame()
                    if isinstance(frame, NeedData):
                        break
                    if isinstance(frame, OversizedFrame):
                        # Logged by the owner, which rate-limits it.
                        if self._on_bad_frame is not None:
                            self._on_bad_frame(name, FramingFault.OVERSIZED, f"{frame.length} bytes, skipped")
                        continue
                    if shedding and _ACK_MARK not in frame:
                        assert self._on_shed is not None
                        self._on_shed(name, frame, now)
                        continue
                    self._on_frame(name, frame, now)
                    self.frames += 1
                    unyielded += 1
                    if unyielded >= _FRAMES_PER_CHECKPOINT:
                        # A read can hold hundreds of events, and reads
                        # follow each other without a wait under load:
                        # let the fake calls they decided start meanwhile.
                        await trio.lowlevel.checkpoint()
                        unyielded = 0
        except FramingError as exc:
            # The byte stream has lost its framing: only a new connection
            # can resynchronise. State is kept; the event that broke is lost.
            log.error("evapi framing lost, reconnecting %s", kv(node=name, reason=exc.reason, detail=exc.detail))
            if self._on_bad_frame is not None:
                self._on_bad_frame(name, exc.reason, exc.detail)

    def _log_lost(self, exc: BaseException) -> None:
        if self._aborted:
            log.warning("evapi connection dropped %s", kv(node=self.node.name, reason="not answering"))
        else:
            log.warning("evapi connection lost %s", kv(node=self.node.name, error=str(exc)))

    def heard_since(self, since: float) -> bool:
        """Whether the node sent anything since ``since`` (or has bytes
        waiting unread): a node that talks is alive, even if an answer is
        late (after this worker was itself frozen, its timers fire before
        it has read what came meanwhile)."""
        stream = self._stream
        return self.last_data >= since or (stream is not None and _unread_bytes(stream) > 0)

    def _check_overload(self, stream: trio.SocketStream) -> None:
        waiting = _unread_bytes(stream)
        if not self.shedding and waiting > self._shed_above:
            self.shedding = True
            log.warning("evapi intake overloaded, shedding events %s", kv(node=self.node.name, waiting=waiting))
        elif self.shedding and waiting < self._shed_below:
            self.shedding = False
            log.warning("evapi intake caught up %s", kv(node=self.node.name, waiting=waiting))

    def resolve(self, result: CommandResult) -> bool:
        """Deliver an acknowledgement; False if no command waits for it."""
        waiter = self._waiters.get(result.id)
        if waiter is None:
            return False
        waiter.result = result
        waiter.event.set()
        return True

    def _fail_waiters(self, reason: CommandFailure, detail: str) -> None:
        for waiter in self._waiters.values():
            if waiter.result is None:
                waiter.result = CommandFailed(reason, detail)
                waiter.event.set()

    async def send_command(self, command: Command, timeout: float) -> CommandResult:
        """Send one command and wait for its acknowledgement.

        Raises :class:`CommandFailed` when not connected, on timeout, or when
        Kamailio answers ``ok: false``.
        """
        outbox = self._outbox
        if outbox is None or outbox.closed:
            raise CommandFailed(CommandFailure.NOT_CONNECTED, f"node {self.node.name} is not connected")
        if not command.id:
            command = msgspec.structs.replace(command, id=self.next_id())
        try:
            frame = encode_command(command)
        except CommandTooLarge as exc:
            raise CommandFailed(CommandFailure.TOO_LARGE, str(exc)) from None
        waiter = _Waiter()
        cmd_id = command.id
        self._waiters[cmd_id] = waiter
        try:
            try:
                outbox.put(frame)
            except OutboxFull as exc:
                raise CommandFailed(CommandFailure.BACKLOG, f"Kamailio does not read its commands: {exc}") from None
            deadline = trio.current_time() + timeout
            regrants = _REGRANTS
            while True:
                with trio.move_on_at(deadline):
                    await waiter.event.wait()
                if waiter.event.is_set():
                    break
                now = trio.current_time()
                if now - deadline < PAUSED or regrants == 0:
                    late = f"{command_name(command)} {cmd_id} not acknowledged in {timeout:g}s"
                    raise CommandFailed(CommandFailure.TIMEOUT, late)
                # This worker did not run past the deadline: the answer may
                # be waiting unread (in this socket or a Redis stream).
                deadline = now + timeout
                regrants -= 1
        finally:
            del self._waiters[cmd_id]
        result = waiter.result
        if isinstance(result, CommandFailed):
            raise result
        assert result is not None
        if not result.ok:
            raise CommandFailed(CommandFailure.REFUSED, result.error or "Kamailio answered ok=false")
        return result


def _unread_bytes(stream: trio.SocketStream) -> int:
    """Bytes received by the kernel that this worker has not read yet."""
    try:
        buf = fcntl.ioctl(stream.socket.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return 0
    waiting: int = struct.unpack("i", buf)[0]
    return waiting


def _keepalive(stream: trio.SocketStream) -> None:
    """TCP keepalive: a node whose host vanished (power, network) is noticed
    in about 20 s even when no event or command is under way."""
    sock = stream.socket
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 3), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
