"""``evapi-worker demo``: Kamailio, the worker and SIPp phones on loopback.

Starts the bundled Kamailio config in a private runtime folder, connects a
worker to it, plays two short stories with SIPp phones (a call answered on a
desk phone, then a missed call, each with an iPhone that wakes up too late),
tells what happened in plain words, and keeps running until Ctrl-C so you
can send your own SIP traffic.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Final, TextIO

import msgspec
import trio

from .apns import ApnsSettings
from .bundled import bundled
from .config import Config, ConfigError
from .engine import Act, Decision
from .evapi_client import NodeAddress
from .net import bind_error, free_port
from .outcomes import Outcome
from .push_standin import ApnsStandIn, ReceivedPush, make_apns_key, make_tls, serve_standin
from .service import Service
from .sip_values import bracketed
from .sipp_runner import bundled_scenario

__all__ = [
    "DemoError",
    "DemoOptions",
    "KamailioProcess",
    "Phones",
    "Subscriber",
    "Watch",
    "bundled_kamailio_cfg",
    "received",
    "run_demo",
    "start_watched_worker",
]

INSTALL_HINT = (
    "apt-get install kamailio kamailio-extra-modules kamailio-json-modules kamailio-tls-modules "
    "kamailio-sqlite-modules sip-tester openssl"
)
# The demo's SIP domain: a name, not the server's address, as in the field.
DEMO_DOMAIN = "voip.example.org"
DEMO_USERS = ("alice", "bob", "carol", "dave")
IPHONE_UA = "LinphoneiOS/5.2.5 (iPhone; iOS 17.4) LinphoneSDK/5.3.0"
DESK_UA = "Yealink SIP-T46U 108.86.0.45"


class DemoError(Exception):
    """Something the user can fix; the message says how."""


def bundled_kamailio_cfg() -> Path:
    return bundled("kamailio", "kamailio.cfg")


def _scenario(name: str) -> Path:
    return bundled_scenario().with_name(name)


@dataclass(frozen=True)
class Subscriber:
    """An account for the bundled config's digest authentication."""

    user: str
    password: str


@dataclass
class KamailioProcess:
    """A Kamailio running the bundled config in its own folder.

    ``domain`` is the SIP domain it serves besides its address; ``sip6_host``
    an IPv6 address it listens on too, on the same ports; ``tls_port``
    adds a TLS listener with a throw-away self-signed certificate made in
    ``folder``; ``subscribers`` turns digest authentication on, with a
    SQLite subscriber table in ``folder``. ``defines`` are more ``-A``
    settings (``EVW_PUSH_HOLD=5``, ``EVW_HOLD_KNOWN``).
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
        return f"unix:{self.folder / 'kamailio_ctl'}"

    async def wait_registered(self, aor: str, count: int = 1, timeout: float = 5.0) -> None:
        """Return once ``aor`` has ``count`` Contacts registered."""
        await wait_registered(self.control, aor, count, timeout)

    def run_in_folder(self, config: Path) -> list[str]:
        """Kamailio with ``config`` in the foreground, its runtime files
        (pid, control socket) in :attr:`folder`."""
        binary = shutil.which("kamailio") or "kamailio"
        # -x tlsf: Kamailio's O(1) allocator; its default first-fit one
        # cost a third of Kamailio's CPU in a burst of late phones (docs/deploy.md).
        return [
            binary, "-f", str(config), "-DD", "-E", "-x", "tlsf",
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
        setpriv = shutil.which("setpriv")
        if setpriv is not None:
            # Kamailio ends with the process that started it, even one killed
            # with SIGKILL: no Kamailio is left holding the demo's ports.
            cmd = [setpriv, "--pdeathsig", "TERM", *cmd]
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
            self.process = ChildProcess.start(self.command(), log)
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


class ChildProcess:
    """A child process started from this process's main thread.

    ``setpriv --pdeathsig`` ties a child's life to the *thread* that started
    it. Trio starts processes from a worker thread, which ends after some
    seconds idle and would take Kamailio with it in the middle of a demo;
    the main thread lasts as long as the process.
    """

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self.pid = popen.pid

    @classmethod
    def start(cls, command: list[str], log: IO[bytes]) -> ChildProcess:
        """Start ``command`` in a session of its own, output to ``log``."""
        popen = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        return cls(popen)

    @property
    def returncode(self) -> int | None:
        return self._popen.poll()

    async def wait(self) -> int:
        """Wait until it has exited (and reap it)."""
        fd = os.pidfd_open(self.pid)
        try:
            while (code := self._popen.poll()) is None:
                await trio.lowlevel.wait_readable(fd)
        finally:
            os.close(fd)
        return code


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


@dataclass
class Watch:
    """What the worker decided and how its fake calls ended, per Call-ID."""

    decisions: list[Decision] = field(default_factory=list)
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    changed: trio.Event = field(default_factory=trio.Event)

    def on_decision(self, d: Decision) -> None:
        self.decisions.append(d)
        self._kick()

    def on_outcome(self, d: Decision, outcome: Outcome) -> None:
        self.outcomes[d.call_id] = outcome
        self._kick()

    def _kick(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def outcome(self, call_id: str, timeout: float) -> Outcome | None:
        with trio.move_on_after(timeout):
            while call_id not in self.outcomes:
                await self.changed.wait()
        return self.outcomes.get(call_id)


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


class Phones:
    """SIPp phones and callers for the stories; every run is bounded in time.

    Phones register as ``user@domain`` through Kamailio's address, with a
    Contact that names the device (``dev-<instance>``), not the account;
    callers call from ``caller_domain``, a domain this Kamailio does not
    serve (so its calls need no authentication).
    """

    def __init__(
        self,
        sip_host: str,
        sip_port: int,
        folder: Path,
        domain: str | None = None,
        *,
        caller_domain: str = "caller.example.net",
        passwords: dict[str, str] | None = None,
    ) -> None:
        self.sip_host = sip_host
        self.target = f"{bracketed(sip_host)}:{sip_port}"
        self.folder = folder
        self.domain = domain or sip_host
        self.caller_domain = caller_domain
        self.passwords = passwords or {}

    async def _sipp(self, args: list[str], timeout: float) -> int | None:
        """Run SIPp; its exit code (0: every call went as scripted), None
        when it ran out of time."""
        binary = shutil.which("sipp") or "sipp"
        with trio.move_on_after(timeout):
            result = await trio.run_process(
                [binary, self.target, "-i", self.sip_host, "-m", "1", "-nostdin", *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=False,
                cwd=str(self.folder),
                start_new_session=True,
            )
            return result.returncode
        return None

    async def phone(
        self,
        user: str,
        ua: str,
        instance: str,
        behaviour: str | Path,
        stay_ms: int,
        log: Path,
        *,
        transport: str = "u1",
        contact_host: str | None = None,
        port: int | None = None,
        register: Path | None = None,
    ) -> None:
        """Register ``user``, handle calls with ``behaviour`` (a bundled phone
        scenario's name, or a path) for ``stay_ms``, then unregister.
        ``contact_host`` puts another host than the phone's address in its
        Contact (a phone behind NAT); ``register`` replaces the bundled
        register-stay-unregister scenario."""
        calls = behaviour if isinstance(behaviour, Path) else _scenario(f"{behaviour}.xml")
        auth = ["-au", user, "-ap", self.passwords[user]] if user in self.passwords else []
        await self._sipp(
            [
                "-sf", str(register or _scenario("phone_register.xml")), "-oocsf", str(calls), "-t", transport,
                "-p", str(port or free_port(self.sip_host)), "-d", str(stay_ms), *auth,
                "-key", "user", user, "-key", "domain", self.domain, "-key", "ua", ua, "-key", "instance", instance,
                "-key", "contact_user", f"dev-{instance}",
                "-key", "contact_host", contact_host or bracketed(self.sip_host),
                "-cid_str", f"reg-{instance}-%u-{secrets.token_hex(3)}", "-trace_logs", "-log_file", str(log),
            ],
            timeout=stay_ms / 1000 + 10,
        )  # fmt: skip

    async def call(
        self,
        caller: str,
        caller_name: str,
        callee: str,
        call_id: str,
        scenario: Path | None = None,
        *,
        transport: str = "u1",
        log: Path | None = None,
        timeout: float = 15,
    ) -> int | None:
        """``caller`` calls ``callee``: answered calls last a second, ringing
        ones are given up after 2.5 s (or what ``scenario`` does). Returns
        SIPp's exit code (0: the call went as scripted; None: out of time);
        ``log`` keeps what the scenario logged."""
        logging = ["-trace_logs", "-log_file", str(log)] if log is not None else []
        return await self._sipp(
            [
                "-sf", str(scenario or _scenario("caller.xml")), "-t", transport,
                "-p", str(free_port(self.sip_host)),
                "-key", "caller", caller, "-key", "caller_name", caller_name,
                "-key", "caller_domain", self.caller_domain, "-key", "callee", callee,
                "-key", "domain", self.domain, "-cid_str", call_id, *logging,
            ],
            timeout=timeout,
        )  # fmt: skip


def received(log: Path) -> tuple[str | None, str | None]:
    """(Call-ID of the INVITE, Reason of the CANCEL) a phone logged."""
    call_id = reason = None
    try:
        lines = log.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return None, None
    for line in lines:
        if line.startswith("invite call_id= "):
            call_id = line.split("call_id= ", 1)[1].split(" from=")[0].strip()
        elif line.startswith("cancel call_id= "):
            reason = line.split("reason=", 1)[1].strip() or None
    return call_id, reason


async def _story(
    out: Callable[[str], None],
    kam: KamailioProcess,
    phones: Phones,
    watch: Watch,
    *,
    number: int,
    callee: str,
    desk: str,
    title: str,
) -> None:
    call_id = f"demo-{number}-{secrets.token_hex(4)}@{phones.sip_host}"
    iphone_log = phones.folder / f"iphone-{callee}.log"
    out(f"\n{number}. {title}")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            phones.phone, callee, DESK_UA, f"desk-{callee}", desk, 9000, phones.folder / f"desk-{callee}.log"
        )
        await kam.wait_registered(f"{callee}@{phones.domain}")
        out(f"   alice calls {callee}; {callee}'s desk phone rings, {callee}'s iPhone gets a push and wakes up slowly")
        await phones.call("alice", "Alice Liddell", callee, call_id)
        out(
            "   the call "
            + ("was answered on the desk phone" if desk == "phone_answers" else "was not answered: alice hung up")
        )
        await trio.sleep(0.3)
        out(f"   {callee}'s iPhone registers now, after the call ended")
        nursery.start_soon(phones.phone, callee, IPHONE_UA, f"iphone-{callee}", "phone_rings", 3000, iphone_log)
        outcome = await watch.outcome(call_id, timeout=10)
        decision = next((d for d in watch.decisions if d.call_id == call_id and isinstance(d, Act)), None)
        if decision is None:
            out("   worker: no decision about this call (see the log above)")
        else:
            out(
                f"   worker: late registration, {decision.since_end or 0:.1f} s after the call ended "
                f"-> fake call ({decision.reason}) through Kamailio"
            )
        out(f"   fake call outcome: {outcome.value if outcome else 'none in 10 s'}")
        nursery.cancel_scope.deadline = trio.current_time() + 15
    got_call_id, reason = received(iphone_log)
    same = "the original call's" if got_call_id == call_id else f"NOT the original {call_id}"
    out(f"   the iPhone received an INVITE with Call-ID {got_call_id} ({same})")
    if reason:
        out(f"   and a CANCEL with Reason: {reason}  -> its call log says the call was taken elsewhere")
    else:
        out("   and a CANCEL without Reason  -> its call log shows a missed call")


async def _push_story(
    out: Callable[[str], None],
    phones: Phones,
    watch: Watch,
    apns: ApnsStandIn,
    nursery: trio.Nursery,
    *,
    number: int,
    callee: str,
    wakes_after: float,
    in_time: bool,
) -> None:
    """A call to a sleeping iPhone that the worker pushes; the stand-in
    wakes it ``wakes_after`` seconds after the push, as iOS would."""
    call_id = f"demo-{number}-{secrets.token_hex(4)}@{phones.sip_host}"
    token = secrets.token_hex(32)
    iphone_log = phones.folder / f"iphone-{callee}.log"
    out(
        f"\n{number}. "
        + (
            "A sleeping iPhone, woken by the worker's push in time"
            if in_time
            else "A sleeping iPhone, woken by the worker's push too late"
        )
    )
    await phones.phone(
        callee,
        IPHONE_UA,
        token,
        "phone_rings",
        300,
        phones.folder / f"asleep-{callee}.log",
        register=_scenario("iphone_push_sleeps.xml"),
    )
    out(f"   {callee}'s iPhone registered with its push token, then iOS suspended the app")
    woken = trio.Event()

    async def wake() -> None:
        await trio.sleep(wakes_after)
        out(f"   {callee}'s iPhone woke up {wakes_after:g} s after the push and registers")
        woken.set()
        await phones.phone(
            callee,
            IPHONE_UA,
            token,
            "phone_answers" if in_time else "phone_rings",
            6000,
            iphone_log,
            register=_scenario("iphone_push_register.xml"),
        )

    def on_push(push: ReceivedPush) -> None:
        if push.call_id == call_id:
            out(f"   APNs (stand-in) got a VoIP push for Call-ID {push.call_id}, signed by the worker's key")
            nursery.start_soon(wake)

    apns.on_push = on_push
    if in_time:
        out(f"   alice calls {callee}; the worker pushes the iPhone at once")
        code = await phones.call("alice", "Alice Liddell", callee, call_id)
        got, _ = received(iphone_log)
        out(
            "   the iPhone rang with the real call (Call-ID " + (got or "none") + "), answered, and alice hung up"
            if code == 0 and got == call_id
            else f"   the call did not complete (SIPp exit {code})"
        )
        return
    out(f"   alice calls {callee}; the worker pushes the iPhone; alice gives up after 1.5 s of silence")
    await phones.call("alice", "Alice Liddell", callee, call_id, _scenario("caller_gives_up.xml"))
    outcome = await watch.outcome(call_id, timeout=15)
    out(f"   worker: late registration -> fake call (missed); outcome: {outcome.value if outcome else 'none in 15 s'}")
    got, reason = received(iphone_log)
    out(
        f"   the iPhone received an INVITE with Call-ID {got} and a CANCEL"
        + (f" with Reason {reason}" if reason else " without Reason -> its call log shows a missed call")
    )


async def start_watched_worker(nursery: trio.Nursery, config: Config) -> tuple[Service, Watch]:
    """Start a worker for ``config``'s single node; return once it is connected."""
    service = Service(config)
    watch = Watch()
    service.decision_listeners.append(watch.on_decision)
    service.actions.outcome_listeners.append(watch.on_outcome)
    await nursery.start(service.run)
    (conn,) = service.connections.values()
    with trio.fail_after(10):
        while not conn.connected:  # noqa: ASYNC110 (a short wait at start)
            await trio.sleep(0.02)
    return service, watch


@dataclass(frozen=True)
class DemoOptions:
    """Where the demo's Kamailio listens and what it serves."""

    sip: tuple[str, int] = ("127.0.0.1", 5060)
    evapi: tuple[str, int] = ("127.0.0.1", 8448)
    tls: tuple[str, int] | None = None  # TLS listener; its host must be the SIP host
    sip6: str | None = None  # an IPv6 address to listen on too (same ports)
    domain: str = DEMO_DOMAIN
    auth: bool = False  # digest authentication, with the DEMO_USERS accounts
    play: bool = True  # play the scripted stories first
    push: bool = False  # the worker pushes through a local APNs stand-in, with two stories of its own


async def run_demo(config: Config, options: DemoOptions, out: TextIO) -> None:
    """Run the demo until cancelled (Ctrl-C)."""
    for binary in ("kamailio", "sipp"):
        if shutil.which(binary) is None:
            raise DemoError(f"{binary} not found; install it with: {INSTALL_HINT}")
    sip, evapi = options.sip, options.evapi
    node = NodeAddress("demo", evapi[0], evapi[1], sip[0], sip[1])
    config = msgspec.structs.replace(config, nodes=(node,))
    if ":" in sip[0] and ":" not in config.sipp.local_ip:
        # Kamailio listens on IPv6 alone: the fake calls leave from there too.
        config = msgspec.structs.replace(config, sipp=msgspec.structs.replace(config.sipp, local_ip=sip[0]))
    subscribers = tuple(Subscriber(user, secrets.token_urlsafe(9)) for user in DEMO_USERS) if options.auth else None

    def say(text: str) -> None:
        print(text, file=out, flush=True)

    with tempfile.TemporaryDirectory(prefix="evapi-worker-demo-") as tmp:
        folder = Path(tmp)
        kam = KamailioProcess(
            sip[0], sip[1], evapi[0], evapi[1], "demo", config.sipp.local_ip, folder,
            domain=options.domain, tls_port=options.tls[1] if options.tls else None, subscribers=subscribers,
            sip6_host=options.sip6,
        )  # fmt: skip
        async with kam.running(), trio.open_nursery() as nursery:
            apns: ApnsStandIn | None = None
            if options.push:
                apns, config = await _start_apns_standin(nursery, folder, config)
            service, watch = await start_watched_worker(nursery, config)
            hosts = [bracketed(sip[0])] + ([bracketed(options.sip6)] if options.sip6 else [])
            transports = " and ".join(f"UDP and TCP on {host}:{sip[1]}" for host in hosts)
            if options.tls:
                tls_on = " and ".join(f"{host}:{options.tls[1]}" for host in hosts)
                transports += f", TLS on {tls_on} (a throw-away self-signed certificate)"
            say(f"Kamailio serves the SIP domain {options.domain}: {transports}.")
            say(f"The worker connects to its evapi socket on {evapi[0]}:{evapi[1]}.")
            if subscribers:
                accounts = ", ".join(f"{s.user} / {s.password}" for s in subscribers)
                say(f"Digest authentication is on; accounts: {accounts}")
            else:
                say("No authentication: anyone may register as anyone (loopback trials only; --auth turns it on).")
            e = config.engine
            say(f"The worker is connected; late window {e.window:g} s from the call's {e.anchor.value}.")
            if config.metrics is not None and service.metrics_port is not None:
                host = config.metrics[0]
                say(
                    f"Metrics: http://{host}:{service.metrics_port}/metrics, health: http://{host}:{service.metrics_port}/healthz"
                )
            if options.play:
                passwords = {s.user: s.password for s in subscribers or ()}
                phones = Phones(sip[0], sip[1], folder, options.domain, passwords=passwords)
                await _story(
                    say, kam, phones, watch, number=1, callee="bob", desk="phone_answers",
                    title="A call answered on another device",
                )  # fmt: skip
                await _story(
                    say, kam, phones, watch, number=2, callee="carol", desk="phone_rings",
                    title="A missed call",
                )  # fmt: skip
                if apns is not None:
                    await _push_story(
                        say, phones, watch, apns, nursery, number=3, callee="dave", wakes_after=0.5, in_time=True
                    )
                    await _push_story(
                        say, phones, watch, apns, nursery, number=4, callee="erin", wakes_after=2.5, in_time=False
                    )
            say(
                f"\nReady. Register phones as USER@{options.domain} through {bracketed(sip[0])}:{sip[1]} "
                "and call each other; "
                f"a User-Agent matching {', '.join(config.engine.user_agents)} or a pn-provider=apns Contact "
                f"counts as an iPhone. Kamailio's log: {kam.log}. Ctrl-C stops."
            )
            await trio.sleep_forever()


async def _start_apns_standin(nursery: trio.Nursery, folder: Path, config: Config) -> tuple[ApnsStandIn, Config]:
    """A local APNs stand-in (HTTP/2 over TLS, a throw-away CA and key) and
    the config that makes the worker push through it."""
    ca, cert, key = make_tls(folder / "apns")
    key_file = folder / "apns" / "AuthKey_DEMO000001.p8"
    apns = ApnsStandIn(make_apns_key(key_file), "DEMO000001", "DEMOTEAM01")
    port = await nursery.start(partial(serve_standin, apns.handle, cert, key))
    settings = ApnsSettings(
        key_file=key_file, key_id="DEMO000001", team_id="DEMOTEAM01", url=f"https://127.0.0.1:{port}", ca_file=ca
    )
    push = msgspec.structs.replace(config.push, apns=settings)
    return apns, msgspec.structs.replace(config, push=push)


def check_demo_addresses(options: DemoOptions) -> None:
    if ":" in options.evapi[0]:
        # evapi's bind_addr is split at its first colon (Kamailio 5.6).
        raise ConfigError("--evapi", "Kamailio's evapi module cannot listen on an IPv6 address: use an IPv4 one")
    if options.sip6 is not None and (":" not in options.sip6 or ":" in options.sip[0]):
        raise ConfigError("--sip6", "must be an IPv6 address, beside an IPv4 --sip")
    if options.tls is not None and options.tls[0] != options.sip[0]:
        raise ConfigError("--tls", f"must be on the SIP address {options.sip[0]} (the bundled config listens on one)")
    if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.\-]{0,252})", options.domain):
        raise ConfigError("--domain", f"{options.domain!r} is not a domain name")
