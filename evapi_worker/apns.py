"""Apple Push Notification service: VoIP pushes over HTTP/2, token
authentication.

One long-lived HTTP/2 connection per environment (our own small client,
http2_client.py: a general-purpose one spent most of a push's time in its
layers) (``api.push.apple.com``
for ``pn-provider=apns``, ``api.sandbox.push.apple.com`` for ``apns.dev``;
``url`` replaces both, for a stand-in), every push multiplexed on it. The
provider token is an ES256 JWT (header ``kid``, claims ``iss`` = the team
and ``iat``), made again every 40 minutes: Apple refuses one older than an
hour and one renewed more often than every 20 minutes.

The payload is the one Linphone-based apps read (liblinphone's iOS core
takes ``aps["call-id"]`` to match the INVITE to its CallKit call), as
Flexisip sends it.
"""

from __future__ import annotations

import ssl
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Final

import jwt
import msgspec

from .core.push_answers import AnswerRules, PushAnswer, PushResult
from .core.push_book import PushJob
from .http2_client import H2Client, H2Error

__all__ = [
    "PRODUCTION",
    "SANDBOX",
    "ApnsClient",
    "ApnsSettings",
    "apns_payload",
    "tls_context",
    "utc_text",
]

PRODUCTION: Final = "https://api.push.apple.com"
SANDBOX: Final = "https://api.sandbox.push.apple.com"
_TOKEN_LIFE: Final = 40 * 60.0
MAX_PAYLOAD: Final = 5120  # bytes, for VoIP pushes


class ApnsSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[push.apns]``: the token key from the Apple Developer account."""

    key_file: Path  # the .p8 key (never world-readable)
    key_id: str  # its 10-character Key ID
    team_id: str  # the 10-character Team ID
    url: str | None = None  # replaces both Apple hosts (a stand-in)
    ca_file: Path | None = None  # an extra CA to trust (a stand-in's)
    timeout: float = 5.0  # seconds one push may take


def apns_payload(job: PushJob, push_id: str, now: float, expiration: int) -> bytes:
    """The VoIP payload for ``job``: at most :data:`MAX_PAYLOAD` bytes.
    Besides what Linphone reads, ``call-start`` (the call's start, UTC, as
    ``send-time``) and ``pn_ttl`` (seconds the push may be kept) let an app
    tell a push delivered after its call can have ended."""
    name = job.caller_name
    body = {
        "aps": {
            "sound": "",
            "loc-key": "IC_MSG",
            "loc-args": [name],
            "call-id": job.call_id,
            "uuid": push_id,
            "send-time": utc_text(now),
        },
        "from-uri": job.caller_uri,
        "display-name": name,
        "call-start": utc_text(job.ts),
        "pn_ttl": expiration,
    }
    return msgspec.json.encode(body)


def utc_text(when: float) -> str:
    """A unix time as the payloads write it: ``2026-12-06 12:00:00`` (UTC)."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(when))


def tls_context(ca_file: Path | None, *, http2_only: bool = False) -> ssl.SSLContext:
    """The system's CAs, and ``ca_file`` besides when given; HTTP/2 by ALPN."""
    context = ssl.create_default_context()
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    context.set_alpn_protocols(["h2"] if http2_only else ["h2", "http/1.1"])
    return context


class ApnsClient:
    """Sends VoIP pushes; :meth:`aclose` closes its connections."""

    def __init__(
        self, settings: ApnsSettings, key: bytes, expiration: int = 30, clock: Callable[[], float] = time.time
    ) -> None:
        self.settings = settings
        self.expiration = expiration  # seconds Apple may keep a push for an offline phone (push.expiration)
        self._key = key
        self._clock = clock
        self._token: tuple[str, float] | None = None  # (JWT, made at)
        self._tls = tls_context(settings.ca_file, http2_only=True)
        self._clients: dict[str, H2Client] = {}

    def provider_token(self) -> str:
        """The current provider token, made again when 40 minutes old."""
        now = self._clock()
        if self._token is None or now - self._token[1] >= _TOKEN_LIFE:
            claims = {"iss": self.settings.team_id, "iat": int(now)}
            token = jwt.encode(claims, self._key, algorithm="ES256", headers={"kid": self.settings.key_id})
            self._token = (token, now)
        return self._token[0]

    def renew_token(self) -> None:
        """Apple said the token expired: the next push makes a new one."""
        self._token = None

    def _client(self, provider: str) -> H2Client:
        base = self.settings.url or (SANDBOX if provider == "apns.dev" else PRODUCTION)
        client = self._clients.get(base)
        if client is None:
            client = H2Client(base, self._tls, self.settings.timeout)
            self._clients[base] = client
        return client

    async def send(self, job: PushJob) -> PushAnswer:
        """Send one VoIP push; the answer as the pusher acts on it."""
        push_id = str(uuid.uuid4())
        now = self._clock()
        payload = apns_payload(job, push_id, now, self.expiration)
        if len(payload) > MAX_PAYLOAD:
            return PushAnswer(PushResult.FAILED, 0, "payload too large")
        headers = {
            "authorization": f"bearer {self.provider_token()}",
            "apns-push-type": "voip",
            "apns-topic": job.topic,
            "apns-priority": "10",
            # Apple keeps the push this long for a phone that is offline (0:
            # now or never); of several kept, it delivers the latest of the
            # same collapse id.
            "apns-expiration": str(int(now) + self.expiration if self.expiration else 0),
            "apns-collapse-id": job.collapse_id,
            "apns-id": push_id,
            "content-type": "application/json",
        }
        try:
            status, body = await self._client(job.provider).request("POST", f"/3/device/{job.token}", headers, payload)
        except H2Error as exc:
            return PushAnswer(PushResult.RETRY, 0, str(exc))
        reason, gone_since = _reason(body)
        return RULES.classify(status, reason, gone_since)

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()


def _reason(body: bytes) -> tuple[str, float | None]:
    """Apple's ``reason``, and the ``timestamp`` of a 410 (milliseconds
    since 1970: since when the token is gone) as unix time."""
    try:
        answer = msgspec.json.decode(body) if body else {}
    except msgspec.DecodeError:
        return "", None
    if not isinstance(answer, dict):
        return "", None
    reason, stamp = answer.get("reason", ""), answer.get("timestamp")
    gone_since = None
    if isinstance(stamp, int | float) and not isinstance(stamp, bool) and 0 < stamp < 1e14:
        gone_since = stamp / 1000
    return (reason if isinstance(reason, str) else ""), gone_since


# Apple's words (developer.apple.com, "Handling notification responses from APNs").
RULES: Final = AnswerRules(
    unregistered=(410, "Unregistered"),
    bad_token=(400, frozenset(("BadDeviceToken", "DeviceTokenNotForTopic", "TopicDisallowed"))),
    auth=(403, frozenset(("ExpiredProviderToken", "InvalidProviderToken"))),
)
