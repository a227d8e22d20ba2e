"""Firebase Cloud Messaging, HTTP v1: high-priority data messages to
Android devices (Linphone's Android app, ``pn-provider=fcm``).

Authorization is an OAuth2 access token for the service account: a JWT
assertion signed with the account's private key (RS256) is exchanged at
the token endpoint; the token is kept until a minute before it expires.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Final

import jwt
import msgspec
import trio

from .apns import tls_context, utc_text
from .core.push_answers import AnswerRules, PushAnswer, PushResult
from .core.push_book import PushJob
from .http2_client import H2Client, H2Error

__all__ = ["FcmClient", "FcmSettings", "ServiceAccount", "fcm_message"]

_SCOPE: Final = "https://www.googleapis.com/auth/firebase.messaging"
_DEFAULT_URL: Final = "https://fcm.googleapis.com"


class FcmSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[push.fcm]``: the service account key from the Firebase console."""

    service_account_file: Path  # the JSON key (never world-readable)
    url: str | None = None  # replaces https://fcm.googleapis.com (a stand-in)
    token_url: str | None = None  # replaces the key's token_uri (a stand-in)
    ca_file: Path | None = None  # an extra CA to trust (a stand-in's)
    timeout: float = 5.0  # seconds one request may take


class ServiceAccount(msgspec.Struct, frozen=True):
    """The fields of a service account key this client uses."""

    project_id: str
    client_email: str
    private_key: str
    token_uri: str = "https://oauth2.googleapis.com/token"


def fcm_message(job: PushJob, ttl: int, *, validate_only: bool = False) -> bytes:
    """The send request's body: a high-priority data message, kept ``ttl``
    seconds for a phone that is offline (of several kept, the latest of the
    same collapse key is delivered). ``validate_only``: checked by FCM,
    never delivered."""
    data = {
        "call-id": job.call_id,
        "from-uri": job.caller_uri,
        "display-name": job.caller_name,
        "call-start": utc_text(job.ts),
        "pn_ttl": str(ttl),
    }
    body: dict[str, object] = {
        "message": {
            "token": job.token,
            "android": {"priority": "high", "ttl": f"{ttl}s", "collapse_key": job.collapse_id},
            "data": data,
        }
    }
    if validate_only:
        body["validate_only"] = True
    return msgspec.json.encode(body)


class FcmClient:
    """Sends data messages; :meth:`aclose` closes its connection."""

    def __init__(
        self, settings: FcmSettings, account: ServiceAccount, ttl: int = 30, clock: Callable[[], float] = time.time
    ) -> None:
        self.settings = settings
        self.ttl = ttl  # seconds FCM may keep a message for an offline phone (push.expiration)
        self.account = account
        self._clock = clock
        self._access: tuple[str, float] | None = None  # (token, good until)
        self._lock = trio.Lock()  # one token request at a time
        tls = tls_context(settings.ca_file, http2_only=True)
        self._token_url = urllib.parse.urlsplit(settings.token_url or account.token_uri)
        self._token_http = H2Client(f"https://{self._token_url.netloc}", tls, settings.timeout)
        self._http = H2Client(settings.url or _DEFAULT_URL, tls, settings.timeout)

    def renew_token(self) -> None:
        """The token was refused: the next message asks for a new one."""
        self._access = None

    async def access_token(self) -> str | PushAnswer:
        """The current access token, or why none could be had."""
        async with self._lock:
            now = self._clock()
            if self._access is not None and now < self._access[1]:
                return self._access[0]
            audience = urllib.parse.urlunsplit(self._token_url)
            claims = {"iss": self.account.client_email, "scope": _SCOPE, "aud": audience, "iat": int(now),
                      "exp": int(now) + 3600}  # fmt: skip
            assertion = jwt.encode(claims, self.account.private_key, algorithm="RS256")
            form = urllib.parse.urlencode(
                {"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": assertion}
            ).encode()
            headers = {"content-type": "application/x-www-form-urlencoded"}
            try:
                status, body = await self._token_http.request("POST", self._token_url.path or "/", headers, form)
            except H2Error as exc:
                return PushAnswer(PushResult.RETRY, 0, f"token: {exc}")
            if status != 200:
                result = PushResult.RETRY if status >= 500 else PushResult.FAILED
                return PushAnswer(result, status, f"token: {body[:200].decode(errors='replace')}")
            try:
                granted = json.loads(body)
                token, expires_in = str(granted["access_token"]), float(granted.get("expires_in", 3600))
            except (ValueError, KeyError, TypeError):
                return PushAnswer(PushResult.FAILED, 200, "token: not an access token")
            self._access = (token, now + max(0.0, expires_in - 60))
            return token

    async def send(self, job: PushJob, *, validate_only: bool = False) -> PushAnswer:
        """Send one data message (``validate_only``: FCM checks it and the
        credentials, delivers nothing); the answer as the pusher acts on it."""
        token = await self.access_token()
        if isinstance(token, PushAnswer):
            return token
        path = f"/v1/projects/{self.account.project_id}/messages:send"
        headers = {"authorization": f"Bearer {token}", "content-type": "application/json"}
        try:
            status, body = await self._http.request(
                "POST", path, headers, fcm_message(job, self.ttl, validate_only=validate_only)
            )
        except H2Error as exc:
            return PushAnswer(PushResult.RETRY, 0, str(exc))
        return RULES.classify(status, _error_status(body))

    async def aclose(self) -> None:
        await self._http.aclose()
        await self._token_http.aclose()


def _error_status(body: bytes) -> str:
    try:
        error = json.loads(body).get("error", {}) if body else {}
        details = error.get("details") or []
        for detail in details:
            code = detail.get("errorCode")
            if isinstance(code, str):
                return code  # FCM's own: UNREGISTERED, INVALID_ARGUMENT, ...
        status = error.get("status", "")
    except (ValueError, AttributeError):
        return ""
    return status if isinstance(status, str) else ""


# FCM's words (firebase.google.com, "FCM error codes"): a 401 is an access
# token that expired or was revoked, whatever the reason says.
RULES: Final = AnswerRules(
    unregistered=(404, "UNREGISTERED"),
    bad_token=(400, frozenset(("INVALID_ARGUMENT", "SENDER_ID_MISMATCH"))),
    auth=(401, None),
)
