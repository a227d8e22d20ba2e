"""Sends the push of each call to each of the account's push devices, and
acts on the answers.

A push goes out only while its call still rings, and only from the worker
that claims it on the call's node (every worker hears every call; the node
lets one claim win). Apple's and Google's answers are acted on: a token
that is gone or wrong is forgotten until the device registers again,
refused credentials are renewed and the push tried once more, throttling
and failures are retried with backoff while the call rings, never after.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Final, Protocol

import msgspec
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from .apns import ApnsClient
from .config import ConfigError, PushSettings
from .fcm import FcmClient, ServiceAccount
from .logs import kv
from .metrics import Metrics
from .push_answers import PushAnswer, PushOutcome, PushResult
from .push_book import PushBook, PushJob

__all__ = ["PushClient", "Pusher", "push_claim_key", "push_clients"]

log = logging.getLogger("evapi_worker.push")

_FIRST_RETRY: Final = 0.2
_MAX_RETRY: Final = 5.0
# Pushes sent and not yet answered by the device's REGISTER, for the
# wake-up delay: bounded, the oldest forgotten first.
_MAX_WAITING_WAKE: Final = 100_000


class PushClient(Protocol):
    async def send(self, job: PushJob) -> PushAnswer: ...

    def renew_token(self) -> None: ...

    async def aclose(self) -> None: ...


_APPLE_ID_RE: Final = re.compile(r"[A-Z0-9]{10}")


def _secret(path: Path, key: str) -> bytes:
    """A key file's bytes; it must be readable here and by no other user."""
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(key, f"{str(path)!r} cannot be read: {exc.strerror or exc}") from None
    if mode & 0o004:
        raise ConfigError(key, f"{str(path)!r} is readable by every user (chmod o-rwx it)")
    return data


def push_clients(settings: PushSettings) -> dict[str, PushClient]:
    """The clients of the configured providers, by ``pn-provider``;
    :class:`ConfigError` names a key file that cannot serve."""
    clients: dict[str, PushClient] = {}
    if (apns := settings.apns) is not None:
        for name, value in (("key_id", apns.key_id), ("team_id", apns.team_id)):
            if not _APPLE_ID_RE.fullmatch(value):
                raise ConfigError(f"push.apns.{name}", f"{value!r} is not a 10-character Apple ID")
        key = _secret(apns.key_file, "push.apns.key_file")
        try:
            loaded = serialization.load_pem_private_key(key, None)
        except (ValueError, TypeError):
            loaded = None
        if not (isinstance(loaded, ec.EllipticCurvePrivateKey) and isinstance(loaded.curve, ec.SECP256R1)):
            raise ConfigError("push.apns.key_file", f"{str(apns.key_file)!r} is not an APNs token key (.p8, P-256)")
        client = ApnsClient(apns, key)
        clients["apns"] = clients["apns.dev"] = client
    if (fcm := settings.fcm) is not None:
        data = _secret(fcm.service_account_file, "push.fcm.service_account_file")
        try:
            account = msgspec.json.decode(data, type=ServiceAccount)
            private = serialization.load_pem_private_key(account.private_key.encode(), None)
        except (msgspec.DecodeError, ValueError, TypeError) as exc:
            raise ConfigError("push.fcm.service_account_file", f"not a service account key: {exc}") from None
        if not isinstance(private, rsa.RSAPrivateKey):
            raise ConfigError("push.fcm.service_account_file", "its private_key is not an RSA key")
        clients["fcm"] = FcmClient(fcm, account)
    return clients


def push_claim_key(call_id: str, device: str) -> str:
    """The name every worker gives one push (call, device) on the node."""
    return hashlib.sha256(f"push\n{call_id}\n{device}".encode()).hexdigest()[:32]


Claim = Callable[[str, str], Awaitable[bool]]
"""``(node, claim key)`` -> whether this worker may send it."""


class Pusher:
    def __init__(
        self,
        clients: Mapping[str, PushClient],
        book: PushBook,
        metrics: Metrics,
        ringing: Callable[[str], bool],
        claim: Claim,
        *,
        limit: int = 1000,
        give_up_after: float = 60.0,
        on_sent: Callable[[PushJob, float], None] | None = None,
    ) -> None:
        self.clients = clients  # by provider: "apns", "apns.dev", "fcm"
        self.book = book
        self.metrics = metrics
        self.ringing = ringing  # whether a call (by Call-ID) still rings
        self.claim = claim
        self.limit = limit
        self.give_up_after = give_up_after  # seconds after the call started
        self.on_sent = on_sent  # told each push the provider accepted, and when (Trio's clock)
        self._nursery: trio.Nursery | None = None
        self._open = 0
        self._sent: dict[tuple[str, str], float] = {}  # (aor, device) -> when its last push was accepted

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send pushes until cancelled; closes the clients at the end."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True):
                for client in set(self.clients.values()):
                    await client.aclose()

    def submit(self, jobs: Sequence[PushJob]) -> None:
        """Start the pushes of a call that just started."""
        for job in jobs:
            if job.provider not in self.clients:
                self._count(job, PushOutcome.NOT_CONFIGURED)
            elif self._nursery is None or self._open >= self.limit:
                self._count(job, PushOutcome.DROPPED)
                log.warning("push dropped %s", kv(call_id=job.call_id, device=job.device, reason="too many at once"))
            else:
                self._open += 1
                self._nursery.start_soon(self._push, job)

    def woke(self, aor: str, device: str, now: float) -> float | None:
        """A device registered: seconds since its push was accepted, if one was."""
        sent = self._sent.pop((aor, device), None)
        return None if sent is None else now - sent

    async def _push(self, job: PushJob) -> None:
        try:
            result = await self._deliver(job)
        except Exception as exc:  # the error boundary of one push
            log.exception("push failed %s", kv(call_id=job.call_id, device=job.device, error=repr(exc)))
            result = PushOutcome.FAILED
        finally:
            self._open -= 1
        self._count(job, result)

    async def _deliver(self, job: PushJob) -> PushOutcome:
        if not self.ringing(job.call_id):
            return PushOutcome.ENDED  # it ended before its push could go out
        if not await self.claim(job.node, push_claim_key(job.call_id, job.device)):
            return PushOutcome.TAKEN  # another worker sends it
        client = self.clients[job.provider]
        renewed = False
        delay = _FIRST_RETRY
        while True:
            answer = await client.send(job)
            now = trio.current_time()
            if answer.result is PushResult.SENT:
                self.metrics.push_latency.labels(job.provider).observe(max(0.0, now - job.received))
                self._note_sent(job, now)
                return PushOutcome.SENT
            log.warning(
                "push refused %s",
                kv(call_id=job.call_id, device=job.device, provider=job.provider, status=answer.status,
                   reason=answer.reason, result=answer.result.value),
            )  # fmt: skip
            if answer.result in (PushResult.UNREGISTERED, PushResult.BAD_TOKEN):
                self.book.forget(job.aor, job.device)
                return PushOutcome.of(answer.result)
            if answer.result is PushResult.AUTH and not renewed:
                renewed = True
                client.renew_token()
                continue
            if answer.result is not PushResult.RETRY:
                return PushOutcome.of(answer.result)
            if now + delay - job.received > self.give_up_after:
                return PushOutcome.GAVE_UP
            self.metrics.push_retries.labels(job.provider).inc()
            await trio.sleep(delay)
            delay = min(delay * 2, _MAX_RETRY)
            if not self.ringing(job.call_id):
                return PushOutcome.ENDED  # never after the call ended

    def _note_sent(self, job: PushJob, now: float) -> None:
        if len(self._sent) >= _MAX_WAITING_WAKE:
            del self._sent[next(iter(self._sent))]
        self._sent[(job.aor, job.device)] = now
        if self.on_sent is not None:
            self.on_sent(job, now)

    def _count(self, job: PushJob, result: PushOutcome) -> None:
        self.metrics.pushes.labels(job.provider, result).inc()
        level = logging.INFO if result in (PushOutcome.SENT, PushOutcome.TAKEN, PushOutcome.ENDED) else logging.WARNING
        log.log(level, "push_done %s", kv(call_id=job.call_id, device=job.device, provider=job.provider, result=result))
