"""A redis-server run by this process (the demo's, the benchmarks' and the
tests'): on a loopback port of its own, nothing saved to disk, stopped
after. A Redis this process did not start is never touched."""

from __future__ import annotations

import shutil
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from ..net import free_port

__all__ = ["RedisProcess", "redis_process"]


class RedisProcess:
    """One redis-server on 127.0.0.1; :meth:`start` and :meth:`stop` it."""

    def __init__(self, folder: Path, port: int | None = None, *options: str) -> None:
        self.folder = folder
        self.port = port or free_port("127.0.0.1", socket.SOCK_STREAM)
        self.options = options  # more of redis-server's options (--replicaof HOST PORT, --sentinel...)
        self.process: trio.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log(self) -> Path:
        return self.folder / f"redis-{self.port}.log"

    async def start(self, timeout: float = 10.0) -> None:
        """Start it and return once it takes connections (RuntimeError if not)."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found; install it with: apt-get install redis-server")
        with self.log.open("ab") as log:
            self.process = await trio.lowlevel.open_process(
                [
                    binary, *self.options, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                    "--appendonly", "no", "--dir", str(self.folder), "--daemonize", "no",
                ],
                stdout=log, stderr=log, start_new_session=True,
            )  # fmt: skip
        with trio.move_on_after(timeout):
            while self.process.returncode is None:
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", self.port)
                except OSError:
                    await trio.sleep(0.02)
                    continue
                await stream.aclose()
                return
        tail = self.log.read_text(errors="replace")[-500:]
        await self.stop()
        raise RuntimeError(f"redis-server did not start on port {self.port}:\n{tail}")

    async def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop it (``sig``, then SIGKILL after 10 s) and reap it."""
        process, self.process = self.process, None
        if process is None or process.returncode is not None:
            return
        process.send_signal(sig)
        with trio.CancelScope(shield=True):
            with trio.move_on_after(10):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()


@asynccontextmanager
async def redis_process(folder: Path) -> AsyncIterator[RedisProcess]:
    """A redis-server for the ``async with`` block."""
    server = RedisProcess(folder)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
