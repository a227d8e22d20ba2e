"""``evapi-worker push check``: one real request to Apple or Google with
the settings file's keys, and what the answer means.

APNs has no dry run: a push to a phone's token reaches that phone (its app
shows a call that ends by itself). Without ``--apns-token`` the check sends
to a device token no phone has: Apple checks the provider token (key, key
id, team) first and then refuses the device token, so ``BadDeviceToken``
says the credentials work. With a phone's VoIP token it checks the topic
and the environment (a development build's token is a sandbox token) too.
FCM's ``validate_only`` checks the credentials and a token without
delivering anything.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Final

from .apns import PRODUCTION, SANDBOX, ApnsClient
from .config import ConfigError, PushSettings
from .core.push_answers import PushAnswer
from .core.push_book import PushJob
from .fcm import FcmClient
from .pusher import push_clients

__all__ = ["MADE_UP_APNS_TOKEN", "MADE_UP_FCM_TOKEN", "CheckResult", "check_push"]

MADE_UP_APNS_TOKEN: Final = "0" * 64  # no phone has it
MADE_UP_FCM_TOKEN: Final = "evapi-worker-push-check"

# Apple's reasons (developer.apple.com, "Handling notification responses from APNs").
_APNS: Final = {
    "InvalidProviderToken": "Apple refused the provider token: key_id, team_id or the key file do not belong "
    "together (Apple Developer account → Keys: the key's ID, and your Team ID)",
    "ExpiredProviderToken": "Apple finds the provider token too old: this machine's clock is off (use NTP)",
    "MissingProviderToken": "no provider token was sent",
    "BadDeviceToken": "Apple refused the device token: a token of the other environment (a development "
    "build registers a sandbox token: pn-provider=apns.dev, --sandbox) or not a device token at all",
    "DeviceTokenNotForTopic": "the device token belongs to another app than the topic's (check the bundle id "
    "in pn-param and --topic)",
    "TopicDisallowed": "this key may not push to the topic (a key of another team, or the app's push "
    "capability is off)",
    "BadTopic": "the topic is not an app's (its bundle id followed by .voip)",
    "MissingTopic": "no topic was sent",
    "Unregistered": "the app was removed from that phone, or the token expired: the phone must register again",
    "TooManyProviderTokenUpdates": "provider tokens renewed too often (the worker renews every 40 minutes)",
    "TooManyRequests": "too many pushes to this device: try later",
    "InternalServerError": "Apple failed: try later",
    "ServiceUnavailable": "Apple is unavailable: try later",
}
# FCM's error codes (firebase.google.com, "FCM error codes").
_FCM: Final = {
    "INVALID_ARGUMENT": "FCM refused the message: the registration token is not one (an Android phone's pn-prid is)",
    "UNREGISTERED": "the app was removed from that phone, or its token expired: the phone must register again",
    "SENDER_ID_MISMATCH": "the token belongs to another Firebase project than the service account's",
    "PERMISSION_DENIED": "the service account may not send with FCM (give it the Firebase Cloud Messaging "
    "API Admin role, and enable the API in the project)",
    "UNAUTHENTICATED": "FCM refused the access token",
    "QUOTA_EXCEEDED": "FCM's quota is used up: try later",
    "UNAVAILABLE": "FCM is unavailable: try later",
    "INTERNAL": "FCM failed: try later",
}


@dataclass(frozen=True, slots=True)
class CheckResult:
    provider: str  # "apns", "apns.dev" or "fcm"
    where: str  # the service's URL
    ok: bool  # the credentials (and the token, when one was given) work
    status: int  # HTTP status, 0 when no answer came
    reason: str  # the service's word, or the error
    meaning: str  # what it means, in a sentence

    def text(self) -> str:
        answer = f"{self.status} {self.reason}".strip() if self.status else f"no answer: {self.reason}"
        return f"{self.provider} ({self.where}): {answer}\n  {'OK' if self.ok else 'FAILED'}: {self.meaning}"


def _job(provider: str, token: str, topic: str) -> PushJob:
    call_id = f"evapi-worker-push-check-{secrets.token_hex(6)}"
    return PushJob(
        call_id, "", "push-check", "push-check", provider, token, topic, "evapi-worker", "evapi-worker push check",
        None, time.time(), 0.0,
    )  # fmt: skip


def _apns_result(provider: str, where: str, answer: PushAnswer, made_up: bool) -> CheckResult:
    reason = answer.reason
    if answer.status == 200:
        meaning = (
            "accepted: the phone is woken (its app shows a call from evapi-worker that ends by itself)"
            if not made_up
            else "accepted, though no phone has that token: this is not Apple (a stand-in?)"
        )
        return CheckResult(provider, where, True, 200, "accepted", meaning)
    if made_up and reason == "BadDeviceToken":
        meaning = (
            "the key, key id and team id are accepted (Apple refused the made-up device token, as it should); "
            "give --apns-token with a phone's VoIP token to check the topic and the environment too"
        )
        return CheckResult(provider, where, True, answer.status, reason, meaning)
    if answer.status == 0:
        meaning = "no answer: check the network, a proxy, the CA (ca_file) and the url"
        return CheckResult(provider, where, False, 0, reason, meaning)
    meaning = _APNS.get(reason, f"Apple answered {answer.status} {reason or '(no reason)'}")
    return CheckResult(provider, where, False, answer.status, reason, meaning)


def _fcm_result(where: str, answer: PushAnswer, made_up: bool) -> CheckResult:
    reason = answer.reason
    if answer.status == 200:
        meaning = (
            "valid: the message would be delivered (validate_only: nothing was sent)"
            if not made_up
            else "the service account is accepted, and even the made-up token: this is not Google (a stand-in?)"
        )
        return CheckResult("fcm", where, True, 200, "valid", meaning)
    if made_up and reason == "INVALID_ARGUMENT":
        meaning = (
            "the service account is accepted (FCM refused the made-up token, as it should); give --fcm-token "
            "with a phone's token to check it too"
        )
        return CheckResult("fcm", where, True, answer.status, reason, meaning)
    if reason.startswith("token:"):
        meaning = (
            "the OAuth token endpoint refused the service account: the key is revoked or deleted (Firebase "
            "console → Service accounts), or this machine's clock is off"
        )
        return CheckResult("fcm", where, False, answer.status, reason, meaning)
    if answer.status == 0:
        meaning = "no answer: check the network, a proxy, the CA (ca_file) and the url"
        return CheckResult("fcm", where, False, 0, reason, meaning)
    meaning = _FCM.get(reason, f"FCM answered {answer.status} {reason or '(no error code)'}")
    return CheckResult("fcm", where, False, answer.status, reason, meaning)


async def check_push(
    settings: PushSettings,
    *,
    apns_token: str | None = None,
    topic: str | None = None,
    sandbox: bool = False,
    fcm_token: str | None = None,
) -> list[CheckResult]:
    """One request to each configured provider; what each answer means.
    :class:`ConfigError` when nothing is configured or a value is missing."""
    if settings.apns is None and settings.fcm is None:
        raise ConfigError("push", "neither [push.apns] nor [push.fcm] is configured: nothing to check")
    clients = push_clients(settings)
    results: list[CheckResult] = []
    try:
        if settings.apns is not None:
            if not topic:
                raise ConfigError("--topic", "the app's VoIP topic is needed to push to Apple (BUNDLE_ID.voip)")
            if not topic.endswith(".voip"):
                raise ConfigError("--topic", f"{topic!r}: a VoIP topic ends with .voip (BUNDLE_ID.voip)")
            provider = "apns.dev" if sandbox else "apns"
            client = clients[provider]
            assert isinstance(client, ApnsClient)
            token = apns_token or MADE_UP_APNS_TOKEN
            where = settings.apns.url or (SANDBOX if sandbox else PRODUCTION)
            answer = await client.send(_job(provider, token, topic))
            results.append(_apns_result(provider, where, answer, apns_token is None))
        if settings.fcm is not None:
            fcm = clients["fcm"]
            assert isinstance(fcm, FcmClient)
            where = settings.fcm.url or "https://fcm.googleapis.com"
            answer = await fcm.send(_job("fcm", fcm_token or MADE_UP_FCM_TOKEN, ""), validate_only=True)
            results.append(_fcm_result(where, answer, fcm_token is None))
    finally:
        for client in set(clients.values()):
            await client.aclose()
    return results
