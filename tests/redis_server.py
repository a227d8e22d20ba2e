"""A real redis-server for the tests, on a loopback port of its own."""

from __future__ import annotations

import shutil
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from evapi_worker.net import free_port

needs_redis = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")


class RedisServer:
    """One redis-server process this test started (and alone stops)."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        self.folder = folder
        self.port = port or free_port("127.0.0.1", socket.SOCK_STREAM)
        self.process: trio.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        with (self.folder / f"redis-{self.port}.log").open("ab") as log:
            self.process = await trio.lowlevel.open_process(
                [
                    "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                    "--appendonly", "no", "--dir", str(self.folder), "--daemonize", "no",
                ],
                stdout=log, stderr=log,
            )  # fmt: skip
        with trio.fail_after(10):
            while True:
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", self.port)
                except OSError:
                    await trio.sleep(0.02)
                    continue
                await stream.aclose()
                return

    async def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        process, self.process = self.process, None
        if process is not None and process.returncode is None:
            process.send_signal(sig)
            with trio.move_on_after(10):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()


@asynccontextmanager
async def redis_server(folder: Path) -> AsyncIterator[RedisServer]:
    server = RedisServer(folder)
    await server.start()
    try:
        yield server
    finally:
        with trio.CancelScope(shield=True):
            await server.stop()
