"""A Kamailio supervised by this process: the bundled config (or another)
in a private runtime folder, with its SQLite database and TLS certificate,
started, watched until evapi listens, and stopped with its children. The
demo, the tests and the benchmarks run Kamailio through it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import trio

from ..bundled import bundled
from ..children import ChildProcess
from ..core.sip_values import bracketed
from ..net import bind_error

__all__ = [
    "DemoError",
    "KamailioProcess",
    "Subscriber",
    "address_pattern",
    "bundled_kamailio_cfg",
    "control_socket",
    "make_certificate",
    "registered_contacts",
    "wait_registered",
    "write_database",
]


class DemoError(Exception):
    """Something the user can fix; the message says how."""


def bundled_kamailio_cfg() -> Path:
    return bundled("kamailio", "kamailio.cfg")


@dataclass(frozen=True)
class Subscriber:
    """An account for the bundled config's digest authentication."""

    user: str
    password: str


def control_socket(folder: Path) -> str:
    """The control socket of the Kamailio run in ``folder``, for ``kamcmd -s``."""
    return f"unix:{folder / 'kamailio_ctl'}"


@dataclass
class KamailioProcess:
    """A Kamailio running the bundled config in its own folder.

    ``domain`` is the SIP domain it serves besides its address; ``sip6_host``
    an IPv6 address it listens on too, on the same ports; ``tls_port``
    adds a TLS listener with a throw-away self-signed certificate made in
    ``folder``; ``subscribers`` turns digest authentication on, with a
    SQLite subscriber table in ``folder``. ``defines`` are more ``-A``
    settings (``EVW_PUSH_HOLD=5``, ``EVW_HOLD_KNOWN``); ``shm_mib`` its
    shared memory (``-m``; Kamailio's default is 64 MiB).
    """

    sip_host: str
    sip_port: int
    evapi_host: str
    evapi_port: int
    node: str
    worker_ip: str
    folder: Path
    domain: str | None = None
    tls_port: int | None = None
    subscribers: tuple[Subscriber, ...] | None = None
    defines: tuple[str, ...] = ()
    sip6_host: str | None = None
    shm_mib: int | None = None
    process: ChildProcess | None = None

    @property
    def log(self) -> Path:
        return self.folder / "kamailio.log"

    @property
    def database(self) -> Path:
        return self.folder / "evw.sqlite"

    @property
    def control(self) -> str:
        """Its control socket, for ``kamcmd -s``."""
        return control_socket(self.folder)

    async def wait_registered(self, aor: str, count: int = 1, timeout: float = 5.0) -> None:
        """Return once ``aor`` has ``count`` Contacts registered."""
        await wait_registered(self.control, aor, count, timeout)

    def run_in_folder(self, config: Path) -> list[str]:
        """Kamailio with ``config`` in the foreground, its runtime files
        (pid, control socket) in :attr:`folder`."""
        binary = shutil.which("kamailio") or "kamailio"
        # -x tlsf: Kamailio's O(1) allocator; its default first-fit one
        # cost a third of Kamailio's CPU in a burst of late phones (docs/deploy.md).
        memory = ["-m", str(self.shm_mib)] if self.shm_mib else []
        return [
            binary, "-f", str(config), "-DD", "-E", "-x", "tlsf", *memory,
            "-Y", str(self.folder), "-P", str(self.folder / "kamailio.pid"), "-w", str(self.folder),
        ]  # fmt: skip

    def command(self) -> list[str]:
        cmd = [
            *self.run_in_folder(bundled_kamailio_cfg()),
            "-A", f"EVW_SIP_IP={bracketed(self.sip_host)}", "-A", f"EVW_SIP_PORT={self.sip_port}",
            "-A", f'EVW_EVAPI_ADDR="{self.evapi_host}:{self.evapi_port}"',
            "-A", f'EVW_NODE="{self.node}"', "-A", f'EVW_WORKER_ADDRS="{address_pattern(self.worker_ip)}"',
            "-A", f'EVW_DB_URL="sqlite:///{self.database}"', "-A", f'EVW_SQL_CON="evw=>sqlite:///{self.database}"',
            "-A", f'EVW_CTL="{self.control}"',
        ]  # fmt: skip
        if self.sip6_host is not None:
            cmd += ["-A", f"EVW_SIP_IP6={bracketed(self.sip6_host)}"]
        if self.domain:
            cmd += ["-A", f"EVW_DOMAIN={self.domain}"]
        if self.tls_port is not None:
            cmd += [
                "-A", "EVW_WITH_TLS", "-A", f"EVW_TLS_PORT={self.tls_port}",
                "-A", f'EVW_TLS_CERT="{self.folder / "tls-cert.pem"}"',
                "-A", f'EVW_TLS_KEY="{self.folder / "tls-key.pem"}"',
            ]  # fmt: skip
        if self.subscribers is not None:
            cmd += ["-A", "EVW_WITH_AUTH"]
        for define in self.defines:
            cmd += ["-A", define]
        return cmd

    async def _prepare(self) -> None:
        """The certificate and the database the command line points at."""
        if self.tls_port is not None:
            name = self.domain or self.sip_host
            await make_certificate(self.folder / "tls-cert.pem", self.folder / "tls-key.pem", name)
        write_database(self.database, self.subscribers or (), self.domain or self.sip_host)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[KamailioProcess]:
        """Start Kamailio, wait until evapi listens, stop it (and its children) after."""
        ports = [
            (self.sip_host, self.sip_port, socket.SOCK_DGRAM, "SIP (UDP)"),
            (self.sip_host, self.sip_port, socket.SOCK_STREAM, "SIP (TCP)"),
            (self.evapi_host, self.evapi_port, socket.SOCK_STREAM, "evapi"),
        ]
        if self.sip6_host is not None:
            ports += [
                (self.sip6_host, self.sip_port, socket.SOCK_DGRAM, "SIP (UDP, IPv6)"),
                (self.sip6_host, self.sip_port, socket.SOCK_STREAM, "SIP (TCP, IPv6)"),
            ]
        if self.tls_port is not None:
            ports += [
                (host, self.tls_port, socket.SOCK_STREAM, "SIP (TLS)")
                for host in (self.sip_host, self.sip6_host)
                if host is not None
            ]
        for host, port, kind, what in ports:
            if bind_error(host, port, kind) is not None:
                raise DemoError(
                    f"{what} port {host}:{port} is in use "
                    "(a system Kamailio? stop it, or pick another with --sip/--evapi/--tls)"
                )
        await self._prepare()
        with self.log.open("wb") as log:
            # Kamailio ends with the process that started it, even one killed
            # with SIGKILL: no Kamailio is left holding the demo's ports.
            self.process = ChildProcess.start(self.command(), stdout=log, stderr=log, death_signal="TERM")
        try:
            with trio.move_on_after(15) as waiting:
                while True:
                    if self.process.returncode is not None:
                        raise DemoError(f"Kamailio exited at start:\n{self.tail()}")
                    try:
                        stream = await trio.open_tcp_stream(self.evapi_host, self.evapi_port)
                    except OSError:
                        await trio.sleep(0.05)
                        continue
                    await stream.aclose()
                    break
            if waiting.cancelled_caught:
                raise DemoError(f"Kamailio did not open evapi in 15 s:\n{self.tail()}")
            yield self
        finally:
            self._stop()
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await self.process.wait()

    def _stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


def address_pattern(address: str) -> str:
    """A POSIX regular expression (as Kamailio's ``=~`` takes it) that
    matches exactly ``address``, an IPv4 or IPv6 address."""
    if not re.fullmatch(r"[0-9A-Fa-f.:]+", address):
        raise ValueError(f"not an IP address: {address!r}")
    return "^" + address.replace(".", "[.]") + "$"


async def make_certificate(cert: Path, key: Path, name: str) -> None:
    """A throw-away self-signed certificate for ``name`` (openssl)."""
    binary = shutil.which("openssl")
    if binary is None:
        raise DemoError("openssl not found; install it with: apt-get install openssl")
    result = await trio.run_process(
        [
            binary, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={name}",
        ],
        stdin=subprocess.DEVNULL, capture_stdout=True, capture_stderr=True, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise DemoError(f"openssl could not make a certificate: {result.stderr.decode(errors='replace')[-300:]}")


# The tables the bundled config reads: Kamailio's own subscriber schema
# (version 7) and an htable table (version 2) for known push accounts.
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS version (
    table_name VARCHAR(32) NOT NULL PRIMARY KEY, table_version INTEGER DEFAULT 0 NOT NULL);
CREATE TABLE IF NOT EXISTS subscriber (
    id INTEGER PRIMARY KEY NOT NULL, username VARCHAR(64) DEFAULT '' NOT NULL,
    domain VARCHAR(64) DEFAULT '' NOT NULL, password VARCHAR(64) DEFAULT '' NOT NULL,
    ha1 VARCHAR(128) DEFAULT '' NOT NULL, ha1b VARCHAR(128) DEFAULT '' NOT NULL,
    CONSTRAINT subscriber_account_idx UNIQUE (username, domain));
CREATE TABLE IF NOT EXISTS evw_push (
    id INTEGER PRIMARY KEY NOT NULL, key_name VARCHAR(256) DEFAULT '' NOT NULL,
    key_type INTEGER DEFAULT 0 NOT NULL, value_type INTEGER DEFAULT 0 NOT NULL,
    key_value VARCHAR(128) DEFAULT '' NOT NULL, expires INTEGER DEFAULT 0 NOT NULL);
CREATE UNIQUE INDEX IF NOT EXISTS evw_push_key_name_idx ON evw_push (key_name);
INSERT OR IGNORE INTO version VALUES ('subscriber', 7), ('evw_push', 2);
"""


def write_database(path: Path, subscribers: tuple[Subscriber, ...], domain: str) -> None:
    """Create (or extend) the bundled config's SQLite database."""
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.executescript(_SCHEMA)
        db.executemany(
            "INSERT OR REPLACE INTO subscriber (username, domain, password) VALUES (?, ?, ?)",
            [(s.user, domain.lower(), s.password) for s in subscribers],
        )


async def registered_contacts(control: str, aor: str) -> int:
    """How many Contacts the Kamailio behind the control socket ``control``
    has registered for ``aor`` (as an operator asks it: ``kamcmd ul.lookup``)."""
    result = await trio.run_process(
        ["kamcmd", "-s", control, "ul.lookup", "location", aor], capture_stdout=True, capture_stderr=True, check=False
    )
    return int(result.stdout.count(b"\tAddress: "))


async def wait_registered(control: str, aor: str, count: int = 1, timeout: float = 5.0) -> None:
    """Return once ``aor`` has ``count`` Contacts registered."""
    with trio.fail_after(timeout):
        while await registered_contacts(control, aor) < count:  # noqa: ASYNC110 (polls Kamailio, which tells no one)
            await trio.sleep(0.05)
