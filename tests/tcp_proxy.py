"""A TCP relay on loopback whose connections can go silent, as a link does
when a NAT entry dies or a host freezes: no FIN, no RST, nothing forwarded.
Connections made after :meth:`Relay.freeze` are relayed as usual."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from functools import partial

import trio


class Relay:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.connections = 0
        self._frozen: list[trio.Event] = []  # one per live connection: set = frozen

    def freeze(self) -> None:
        """Every connection open now stops forwarding, both ways, and stays open."""
        for event in self._frozen:
            event.set()

    async def _pump(self, source: trio.SocketStream, sink: trio.SocketStream, frozen: trio.Event) -> None:
        while data := await source.receive_some(65536):
            if frozen.is_set():
                await trio.sleep_forever()
            await sink.send_all(data)

    async def _relay(self, client: trio.SocketStream) -> None:
        self.connections += 1
        frozen = trio.Event()
        self._frozen.append(frozen)
        try:
            server = await trio.open_tcp_stream("127.0.0.1", self.target_port)
            async with client, server, trio.open_nursery() as nursery:

                async def pump(a: trio.SocketStream, b: trio.SocketStream) -> None:
                    with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await self._pump(a, b, frozen)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(pump, client, server)
                nursery.start_soon(pump, server, client)
        except OSError:
            pass
        finally:
            self._frozen.remove(frozen)


@asynccontextmanager
async def tcp_relay(target_port: int) -> AsyncIterator[Relay]:
    relay = Relay(target_port)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, relay._relay, 0, host="127.0.0.1"))
        relay.port = listeners[0].socket.getsockname()[1]
        yield relay
        nursery.cancel_scope.cancel()
