"""The end-to-end platform: real Kamailio (the bundled config, or one given),
the real worker service beside it, real SIPp phones and callers; the late
iPhone story every end-to-end module tells."""

from __future__ import annotations

import secrets
import shutil
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from evapi_worker.capture import CaptureSettings
from evapi_worker.config import Config, PushSettings, RedisSettings
from evapi_worker.core.engine import EngineSettings
from evapi_worker.core.links import NodeAddress
from evapi_worker.core.outcomes import Outcome
from evapi_worker.lab.demo import Watch, start_watched_worker
from evapi_worker.lab.kamailio_process import KamailioProcess, Subscriber
from evapi_worker.lab.phones import DESK_UA, IPHONE_UA, Phones
from evapi_worker.lab.redis_process import redis_process
from evapi_worker.service import Service
from evapi_worker.sipp_runner import SippSettings

from .helpers import FAST_RECONNECT, needs_redis
from .sipp_device import free_port, free_sip_port

needs_platform = pytest.mark.skipif(
    shutil.which("kamailio") is None or shutil.which("sipp") is None,
    reason="needs kamailio and sipp (apt-get install kamailio kamailio-extra-modules sip-tester)",
)

HOST = "127.0.0.1"
# A SIP domain that is not the server's address: accounts are bob@DOMAIN,
# contacts are dev-...@127.0.0.1, as in a real deployment.
DOMAIN = "voip.example.org"

# The two ways events reach the worker, for a story told over both:
# ``@pytest.mark.parametrize("redis", EVENT_PATHS)`` and ``platform(redis=redis)``.
EVENT_PATHS = [pytest.param(False, id="evapi"), pytest.param(True, id="redis", marks=needs_redis)]


@dataclass
class Platform:
    service: Service
    phones: Phones
    watch: Watch
    folder: Path
    kamailio: KamailioProcess

    def metric(self, name: str, **labels: str) -> float:
        return self.service.metrics.value(name, labels)

    async def events(self, etype: str, count: int = 1, timeout: float = 5.0) -> None:
        """Wait until the worker has received ``count`` events of ``etype``."""
        with trio.fail_after(timeout):
            while self.metric("evapi_worker_events_total", node=self.service.config.nodes[0].name, type=etype) < count:
                await trio.sleep(0.02)

    async def registered(self, user: str, count: int = 1) -> None:
        """Wait until Kamailio has ``count`` Contacts of ``user`` (not a guess of time)."""
        await self.kamailio.wait_registered(f"{user}@{self.phones.domain}", count)


async def reading(service: Service) -> None:
    """Until the worker reads its Redis stream."""
    assert service.source is not None
    with trio.fail_after(10):
        while not service.source.connected:
            await trio.sleep(0.02)


@asynccontextmanager
async def platform(
    tmp_path: Path,
    domain: str | None = DOMAIN,
    *,
    tls: bool = False,
    subscribers: tuple[Subscriber, ...] | None = None,
    defines: tuple[str, ...] = (),
    sip6: str | None = None,
    worker_sip: str = HOST,
    push: PushSettings | None = None,
    capture: CaptureSettings | None = None,
    kamailio: KamailioProcess | None = None,
    redis: bool = False,
    metrics: tuple[str, int] | None = None,
    hold_anyone: bool = True,
    **engine: Any,
) -> AsyncIterator[Platform]:
    """The bundled Kamailio (serving ``domain``, with TLS, authentication,
    an IPv6 address besides 127.0.0.1 (``sip6``) and more ``-A`` defines
    when asked), or the ``kamailio`` given, and a worker connected to it,
    whose fake calls go out from ``worker_sip`` (127.0.0.1, or the IPv6
    address). With ``redis``, a redis-server of its own carries the events
    (EVW_REDIS) and the shared claims. ``hold_anyone``: calls to any account with
    no contact are held (EVW_HOLD_ANYONE), so a story's iPhone need not
    have registered before; without it, only accounts known to have a push
    device are (the configs' default)."""
    async with AsyncExitStack() as stack:
        settings = None
        if redis:
            server = await stack.enter_async_context(redis_process(tmp_path))
            settings = RedisSettings(url=server.url)
            defines += (f'EVW_REDIS="name=evw;addr={HOST};port={server.port}"',)
        if kamailio is None:
            if hold_anyone:
                defines += ("EVW_HOLD_ANYONE",)
            tls_port = free_port(socket.SOCK_STREAM) if tls else None
            kamailio = KamailioProcess(
                HOST, free_sip_port(), HOST, free_port(socket.SOCK_STREAM), "e2e", worker_sip, tmp_path,
                domain=domain, tls_port=tls_port, subscribers=subscribers, defines=defines, sip6_host=sip6,
            )  # fmt: skip
        else:
            assert not redis, "a Kamailio given is started as it was made"
        kam = kamailio
        await stack.enter_async_context(kam.running())
        nursery = await stack.enter_async_context(trio.open_nursery())
        config = Config(
            nodes=(NodeAddress(kam.node, HOST, kam.evapi_port, worker_sip, kam.sip_port),),
            engine=EngineSettings(**engine),
            sipp=SippSettings(local_ip=worker_sip),
            evapi=FAST_RECONNECT,
            push=push or PushSettings(),
            capture=capture,
            redis=settings,
            metrics=metrics,
        )
        service, watch = await start_watched_worker(nursery, config)
        if redis:
            await reading(service)
        passwords = {s.user: s.password for s in subscribers or ()}
        phones = Phones(HOST, kam.sip_port, tmp_path, domain, passwords=passwords)
        yield Platform(service, phones, watch, tmp_path, kam)
        if redis:
            # Every event of the story came through the stream, none by evapi.
            assert service.source is not None and service.source.entries > 0
            assert sum(service.metrics.events.counts.values()) == service.source.entries
        nursery.cancel_scope.cancel()


async def late_iphone(
    p: Platform, user: str, desk: str | Path, call_id: str, *, caller_name: str = "Alice", **iphone: Any
) -> tuple[Outcome | None, Path]:
    """A desk phone handles the call (answers, rings or declines), then the
    user's iPhone registers after it ended; returns the fake call's outcome
    and the iPhone's log."""
    log = p.folder / f"iphone-{user}.log"
    ua = iphone.pop("ua", IPHONE_UA)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(p.phones.phone, user, DESK_UA, "desk", desk, 4000, p.folder / f"desk-{user}.log")
        await p.registered(user)
        # Answered, declined or given up: the caller's dialog ends as scripted.
        assert await p.phones.call("alice", caller_name, user, call_id) == 0
        nursery.start_soon(partial(p.phones.phone, user, ua, "iphone", "phone_rings", 2500, log, **iphone))
        outcome = await p.watch.outcome(call_id, timeout=10)
    return outcome, log


def raw_register(host: str, port: int, user: str, domain: str, contact_params: str) -> tuple[int, str]:
    """One REGISTER over UDP, as a phone writes it with RFC 8599 parameters
    in its Contact; the final answer's status code and its whole text."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind((HOST, 0))
        sock.settimeout(5)
        local = sock.getsockname()[1]
        tag, call_id = secrets.token_hex(4), f"raw-reg-{secrets.token_hex(6)}"
        request = (
            f"REGISTER sip:{domain} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {HOST}:{local};rport;branch=z9hG4bK-{secrets.token_hex(6)}\r\n"
            f"From: <sip:{user}@{domain}>;tag={tag}\r\nTo: <sip:{user}@{domain}>\r\n"
            f"Call-ID: {call_id}\r\nCSeq: 1 REGISTER\r\nMax-Forwards: 70\r\n"
            f"Contact: <sip:{user}@{HOST}:{local};{contact_params}>\r\nExpires: 60\r\n"
            "User-Agent: LinphoneiOS/5.2\r\nContent-Length: 0\r\n\r\n"
        )
        sock.sendto(request.encode(), (host, port))
        while True:
            reply = sock.recv(65535).decode(errors="replace")
            status = int(reply.split(" ", 2)[1])
            if status >= 200:
                return status, reply
    finally:
        sock.close()
