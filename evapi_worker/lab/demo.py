"""``evapi-worker demo``: Kamailio, the worker and SIPp phones on loopback.

Starts the bundled Kamailio config in a private runtime folder, connects a
worker to it, plays two short stories with SIPp phones (a call answered on a
desk phone, then a missed call, each with an iPhone that wakes up too late),
tells what happened in plain words, and keeps running until Ctrl-C so you
can send your own SIP traffic. Kamailio is supervised by
kamailio_process.py, the phones are phones.py's.
"""

from __future__ import annotations

import re
import secrets
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TextIO

import msgspec
import trio

from ..apns import ApnsSettings
from ..config import Config, ConfigError, RedisSettings
from ..core.engine import Act, Decision
from ..core.links import NodeAddress
from ..core.outcomes import Outcome
from ..core.sip_values import bracketed
from ..service import Service
from ..stream_source import stream_key
from .kamailio_process import DemoError, KamailioProcess, Subscriber
from .phones import DESK_UA, IPHONE_UA, Phones, phone_scenario, received
from .push_standin import ApnsStandIn, ReceivedPush, make_apns_key, make_tls, serve_standin
from .redis_process import RedisProcess

__all__ = [
    "DEMO_DOMAIN",
    "DemoOptions",
    "Watch",
    "check_demo_addresses",
    "run_demo",
    "start_watched_worker",
]

REDIS_HINT = "redis-server kamailio-redis-modules"
INSTALL_HINT = (
    "apt-get install kamailio kamailio-extra-modules kamailio-json-modules kamailio-tls-modules "
    "kamailio-sqlite-modules sip-tester openssl"
)
# The demo's SIP domain: a name, not the server's address, as in the field.
DEMO_DOMAIN = "voip.example.org"
DEMO_USERS = ("alice", "bob", "carol", "dave")


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
        register=phone_scenario("iphone_push_sleeps.xml"),
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
            register=phone_scenario("iphone_push_register.xml"),
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
    await phones.call("alice", "Alice Liddell", callee, call_id, phone_scenario("caller_gives_up.xml"))
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
    redis: bool = False  # events through a local redis-server's stream, claims shared there


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
        redis = RedisProcess(folder) if options.redis else None
        defines: tuple[str, ...] = ()
        if redis is not None:
            if shutil.which("redis-server") is None:
                raise DemoError(f"redis-server not found; install it with: {REDIS_HINT}")
            try:
                await redis.start()
            except RuntimeError as exc:
                raise DemoError(str(exc)) from None
            defines = (f'EVW_REDIS="name=evw;addr=127.0.0.1;port={redis.port}"',)
            config = msgspec.structs.replace(config, redis=RedisSettings(url=redis.url))
        kam = KamailioProcess(
            sip[0], sip[1], evapi[0], evapi[1], "demo", config.sipp.local_ip, folder,
            domain=options.domain, tls_port=options.tls[1] if options.tls else None, subscribers=subscribers,
            sip6_host=options.sip6, defines=defines,
        )  # fmt: skip
        try:
            await _run(config, options, kam, folder, subscribers, say)
        except DemoError as exc:
            if redis is not None and "ndb_redis" in str(exc):
                raise DemoError(
                    f"{exc}\n(--redis needs Kamailio's Redis module: apt-get install {REDIS_HINT})"
                ) from None
            raise
        finally:
            if redis is not None:
                await redis.stop()


async def _run(
    config: Config,
    options: DemoOptions,
    kam: KamailioProcess,
    folder: Path,
    subscribers: tuple[Subscriber, ...] | None,
    say: Callable[[str], None],
) -> None:
    """Kamailio and the worker running, the stories told, until cancelled."""
    sip, evapi = options.sip, options.evapi
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
        if config.redis is not None and service.source is not None:
            with trio.fail_after(10):
                while not service.source.connected:  # noqa: ASYNC110 (a short wait at start)
                    await trio.sleep(0.02)
            say(
                f"Events go through Redis ({config.redis.url}, stream {stream_key('demo')}), "
                "which every worker reads on its own; evapi carries the worker's commands."
            )
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
