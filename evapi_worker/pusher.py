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

import errno
import heapq
import logging
import math
import os
import re
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Final, Protocol

import msgspec
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from .apns import ApnsClient
from .config import ConfigError, PushSettings
from .core.claims import push_claim_key
from .core.push_answers import PushAnswer, PushOutcome, PushResult
from .core.push_book import PushBook, PushJob
from .fcm import FcmClient, ServiceAccount
from .files import FileProblem, open_regular
from .logs import Throttle, kv
from .metrics import Metrics

__all__ = ["PushClient", "Pusher", "key_path", "push_clients"]

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
_MAX_KEY_FILE: Final = 64 * 1024  # a .p8 key is 250 bytes, a service account about 2 KiB


def key_path(path: Path, key: str) -> Path:
    """Where a key file is: an absolute path as written; a bare name is a
    systemd credential (``LoadCredential=NAME:/etc/...`` in the unit), in
    the folder systemd made for it (``$CREDENTIALS_DIRECTORY``), readable
    by the service's user alone."""
    if path.is_absolute():
        return path
    if len(path.parts) != 1 or path.name in (".", ".."):
        raise ConfigError(key, f"{str(path)!r}: give an absolute path, or a credential's name (one file name)")
    folder = os.environ.get("CREDENTIALS_DIRECTORY", "")
    if not folder:
        raise ConfigError(
            key,
            f"{str(path)!r} names a systemd credential (LoadCredential={path}:/etc/...), but "
            "$CREDENTIALS_DIRECTORY is not set: outside systemd, give an absolute path",
        )
    return Path(folder) / path


def _secret(path: Path, key: str) -> bytes:
    """A key file's bytes: a regular file (no link followed, a few KiB at
    most), readable here and by no other user (a systemd credential is)."""
    path = key_path(path, key)
    try:
        fd = open_regular(path)
    except FileProblem as exc:
        raise ConfigError(key, f"{str(path)!r} {exc.problem}") from None
    except OSError as exc:
        hint = ""
        if exc.errno == errno.EACCES and os.environ.get("CREDENTIALS_DIRECTORY") is None:
            hint = ' (under systemd, load it as a credential: docs/deploy.md, "The push keys")'
        raise ConfigError(key, f"{str(path)!r} cannot be read: {exc.strerror or exc}{hint}") from None
    try:
        info = os.fstat(fd)
        if info.st_mode & 0o004:
            raise ConfigError(key, f"{str(path)!r} is readable by every user (chmod o-rwx it)")
        if info.st_size > _MAX_KEY_FILE:
            raise ConfigError(key, f"{str(path)!r} holds {info.st_size} bytes: not a key file")
        data = os.read(fd, _MAX_KEY_FILE + 1)
    except OSError as exc:
        raise ConfigError(key, f"{str(path)!r} cannot be read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
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
        client = ApnsClient(apns, key, settings.expiration)
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
        clients["fcm"] = FcmClient(fcm, account, settings.expiration)
    return clients


Claim = Callable[[str, str], Awaitable[bool]]
"""``(node, claim key)`` -> whether this worker may send it."""


class Pusher:
    """Sends pushes, at most ``limit`` at once, ``per_account`` of them for
    one account and ``rate_per_account`` a second for one account (a bucket
    as deep). Pushes wait in a queue per account and go out round-robin
    between the accounts that wait: one account's storm of calls delays
    another account's push by one turn, and takes no more of the worker
    than its rate. A queue holds at most ``queued_per_account`` pushes;
    past it the account's oldest waiting push is dropped (counted,
    logged)."""

    def __init__(
        self,
        clients: Mapping[str, PushClient],
        book: PushBook,
        metrics: Metrics,
        ringing: Callable[[str, str], bool],
        claim: Claim,
        *,
        limit: int = 1000,
        per_account: int = 32,
        rate_per_account: float = 64.0,
        queued_per_account: int = 256,
        give_up_after: float = 60.0,
        on_sent: Callable[[PushJob, float], None] | None = None,
    ) -> None:
        self.clients = clients  # by provider: "apns", "apns.dev", "fcm"
        self.book = book
        self.metrics = metrics
        self.ringing = ringing  # whether a call (Call-ID, account) still rings
        self.claim = claim
        self.limit = limit
        self.per_account = per_account
        self.rate_per_account = rate_per_account
        self.queued_per_account = queued_per_account
        self.give_up_after = give_up_after  # seconds after the call started
        self.on_sent = on_sent  # told each push the provider accepted, and when (Trio's clock)
        self._nursery: trio.Nursery | None = None
        self._open = 0
        self._open_by_account: dict[str, int] = {}
        # Accounts with pushes waiting that may send one now, in turn order;
        # those at their share wait apart until one of theirs ends.
        self._ready: OrderedDict[str, deque[PushJob]] = OrderedDict()
        self._capped: dict[str, deque[PushJob]] = {}
        # Accounts out of their rate, waiting until the time in _pace_times.
        self._paced: dict[str, deque[PushJob]] = {}
        self._pace_times: list[tuple[float, str]] = []
        self._pace_changed = trio.Event()
        self._tokens: dict[str, tuple[float, float]] = {}  # account -> (tokens, when counted)
        self._sent: dict[tuple[str, str], float] = {}  # (aor, device) -> when its last push was accepted
        self._throttle: Throttle[str] = Throttle()

    @property
    def waiting(self) -> int:
        """Pushes waiting for their turn."""
        return sum(len(q) for table in (self._ready, self._capped, self._paced) for q in table.values())

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send pushes until cancelled; closes the clients at the end."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                self._pump()
                await self._pace()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True):
                for client in set(self.clients.values()):
                    await client.aclose()

    def submit(self, jobs: Sequence[PushJob]) -> None:
        """Queue the pushes of a call that just started; they go out in
        their account's turn."""
        dropped: dict[str, int] = {}  # provider -> pushes dropped (counted at once: a storm drops thousands)
        for job in jobs:
            if job.provider not in self.clients:
                self._count(job, PushOutcome.NOT_CONFIGURED)
                continue
            aor = job.aor
            queue = self._ready.get(aor)
            if queue is None:
                queue = self._capped.get(aor)
            if queue is None:
                queue = self._paced.get(aor)
            if queue is None:
                queue = deque()
                if self._open_by_account.get(aor, 0) >= self.per_account:
                    self._capped[aor] = queue
                else:
                    self._ready[aor] = queue
            if len(queue) >= self.queued_per_account:
                old = queue.popleft()
                dropped[old.provider] = dropped.get(old.provider, 0) + 1
                self._dropped(old, "the account's queue of pushes is full")
            queue.append(job)
        for provider, count in dropped.items():
            self.metrics.pushes.labels(provider, PushOutcome.DROPPED).inc(count)
        self._pump()

    def _pump(self) -> None:
        """Start waiting pushes, one account at a time in turn, while there is room."""
        nursery = self._nursery
        if nursery is None:
            return
        ready = self._ready
        now = trio.current_time()
        while ready and self._open < self.limit:
            aor, queue = next(iter(ready.items()))
            wait = self._take_token(aor, now)
            if wait:
                # Out of its rate: it waits apart, its turn kept for when it may send.
                del ready[aor]
                self._paced[aor] = queue
                heapq.heappush(self._pace_times, (now + wait, aor))
                self._pace_changed.set()
                continue
            job = queue.popleft()
            open_now = self._open_by_account.get(aor, 0) + 1
            self._open_by_account[aor] = open_now
            self._open += 1
            del ready[aor]
            if queue:
                if open_now >= self.per_account:
                    self._capped[aor] = queue
                else:
                    ready[aor] = queue  # its next push waits for the other accounts' turn
            nursery.start_soon(self._push, job)

    def _take_token(self, aor: str, now: float) -> float:
        """Take one of ``aor``'s tokens: 0.0, or the seconds until it has one."""
        rate = self.rate_per_account
        tokens, at = self._tokens.get(aor, (rate, now))
        tokens = min(rate, tokens + (now - at) * rate)
        if tokens > 0.999_999:  # a token, to within rounding
            self._tokens[aor] = (max(0.0, tokens - 1.0), now)
            return 0.0
        self._tokens[aor] = (tokens, now)
        return max(0.001, (1.0 - tokens) / rate)  # a wait the clock can tell from now

    async def _pace(self) -> None:
        """Give accounts back their turn once their rate allows a push."""
        while True:
            times = self._pace_times
            with trio.move_on_at(times[0][0] if times else math.inf):
                await self._pace_changed.wait()
            self._pace_changed = trio.Event()
            now = trio.current_time()
            while times and times[0][0] <= now:
                _, aor = heapq.heappop(times)
                queue = self._paced.pop(aor, None)
                if queue is not None:
                    self._ready[aor] = queue
            if len(self._tokens) > 10_000:
                # Accounts whose bucket has filled up again are forgotten.
                rate = self.rate_per_account
                self._tokens = {a: (t, at) for a, (t, at) in self._tokens.items() if t + (now - at) * rate < rate}
            self._pump()

    def _ended(self, aor: str) -> None:
        self._open -= 1
        left = self._open_by_account[aor] - 1
        if left:
            self._open_by_account[aor] = left
        else:
            del self._open_by_account[aor]
        queue = self._capped.pop(aor, None)
        if queue is not None:
            self._ready[aor] = queue
        self._pump()

    def _dropped(self, job: PushJob, why: str) -> None:
        """Log a dropped push (the caller counts it), a line a second per account."""
        count = self._throttle.note(job.aor, trio.current_time())
        if count:
            log.warning("push dropped %s", kv(account=job.aor, call_id=job.call_id, reason=why, count=count))

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
            self._ended(job.aor)
        self._count(job, result)

    async def _deliver(self, job: PushJob) -> PushOutcome:
        if not self.ringing(job.call_id, job.aor):
            return PushOutcome.ENDED  # it ended before its push could go out
        if not await self.claim(job.node, push_claim_key(job.call_id, job.aor, job.device)):
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
                if not self.book.forget(job.aor, job.device, job.token, answer.gone_since):
                    log.info(
                        "push device kept %s",
                        kv(account=job.aor, device=job.device, why="registered again since the token was refused"),
                    )
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
            if not self.ringing(job.call_id, job.aor):
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
