"""An in-test evapi server: the Kamailio side of the socket, scripted by a test."""

from __future__ import annotations

import json
import time
from functools import partial
from typing import Any

import trio

from evapi_worker.core.netstring import NEED_DATA, NetstringDecoder, encode

from .helpers import frame


class EvapiServer:
    """Accepts worker connections on 127.0.0.1, records commands, acks them."""

    def __init__(self, node: str = "kam1", *, auto_ack: bool = True, ack_ok: bool = True) -> None:
        self.node = node
        self.auto_ack = auto_ack
        self.ack_ok = ack_ok
        self.port = 0
        self.streams: list[trio.SocketStream] = []
        self.commands: list[dict[str, Any]] = []
        self.reads: list[bytes] = []  # raw reads, to check a command came in one piece
        self.accepted = 0
        self._changed = trio.Event()
        self._seq = 0
        self._listeners: list[trio.SocketListener] = []
        self._send_lock = trio.Lock()  # the test and the auto-acks share the stream

    async def start(self, nursery: trio.Nursery, port: int = 0) -> None:
        listeners = await nursery.start(partial(trio.serve_tcp, self._handle, port, host="127.0.0.1"))
        self._listeners = listeners
        self.port = listeners[0].socket.getsockname()[1]

    async def stop_listening(self) -> None:
        for listener in self._listeners:
            await listener.aclose()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, predicate: Any, timeout: float = 5.0) -> None:
        with trio.fail_after(timeout):
            while not predicate():
                await self._changed.wait()

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.accepted += 1
        self.streams.append(stream)
        self._notify()
        decoder = NetstringDecoder()
        try:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                self.reads.append(data)
                decoder.receive_data(data)
                while (frame := decoder.next_frame()) is not NEED_DATA:
                    assert isinstance(frame, bytes)
                    command = json.loads(frame)
                    self.commands.append(command)
                    self._notify()
                    # A worker's hello is taken silently: this stand-in sends
                    # events to every connection (the routes' answer to it
                    # is waited for by no one).
                    if self.auto_ack and command.get("cmd") != "hello":
                        await self.ack(command["id"], self.ack_ok, stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            if stream in self.streams:
                self.streams.remove(stream)
            self._notify()

    @property
    def requests(self) -> list[dict[str, Any]]:
        """The commands other than the worker's hellos (which come first on
        every connection, at a moment of the connection's own)."""
        return [c for c in self.commands if c["cmd"] != "hello"]

    @property
    def actions(self) -> list[dict[str, Any]]:
        """The commands other than the worker's hellos and liveness pings."""
        return [c for c in self.commands if c["cmd"] not in ("hello", "ping")]

    @property
    def stream(self) -> trio.SocketStream:
        return self.streams[-1]

    def event(self, event: str, ts: float, **fields: Any) -> bytes:
        self._seq += 1
        return encode(frame(event, ts, self._seq, node=self.node, **fields))

    async def send(self, data: bytes, stream: trio.SocketStream | None = None) -> None:
        async with self._send_lock:
            await (stream or self.stream).send_all(data)

    async def ack(self, cmd_id: str, ok: bool = True, stream: trio.SocketStream | None = None) -> None:
        extra = {} if ok else {"error": "no such route"}
        # Stamped as Kamailio stamps it: the worker measures the node's clock by it.
        await self.send(self.event("cmd_result", time.time(), id=cmd_id, ok=ok, **extra), stream)

    async def drop(self) -> None:
        await self.stream.aclose()
