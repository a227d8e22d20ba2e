"""What a push service's answer means for the worker, whichever service
it is (APNs, FCM): one vocabulary for the pusher, the metrics and the logs.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["AnswerRules", "PushAnswer", "PushOutcome", "PushResult"]


class PushResult(enum.Enum):
    SENT = "sent"  # accepted for delivery
    UNREGISTERED = "unregistered"  # the token is gone (the app was removed): forget it
    BAD_TOKEN = "bad_token"  # the token or its topic is wrong: forget it until it registers again
    AUTH = "auth"  # our credentials were refused (expired or invalid): renew them, try once more
    RETRY = "retry"  # throttled, the service failed, or the connection did: try again later
    FAILED = "failed"  # refused for another reason (payload, configuration): not tried again


class PushOutcome(enum.StrEnum):
    """How one push ended (the ``result`` label of pushes_total)."""

    SENT = "sent"  # accepted for delivery
    UNREGISTERED = "unregistered"  # the token is gone: forgotten
    BAD_TOKEN = "bad_token"  # the token or its topic is wrong: forgotten
    AUTH = "auth"  # credentials refused, even renewed
    FAILED = "failed"  # refused for another reason, or the push itself failed
    GAVE_UP = "gave_up"  # retried for push.give_up_after in vain
    ENDED = "ended"  # the call ended first: never sent after it
    TAKEN = "taken"  # another worker claimed it and sends it
    DROPPED = "dropped"  # push.max_in_flight pushes were under way
    NOT_CONFIGURED = "not_configured"  # no credentials for the device's provider

    @classmethod
    def of(cls, result: PushResult) -> PushOutcome:
        """The outcome a final answer gives (RETRY is never final)."""
        return cls(result.value)


@dataclass(frozen=True, slots=True)
class PushAnswer:
    result: PushResult
    status: int  # the HTTP status, 0 when no answer came
    reason: str  # the service's reason (APNs' "reason", FCM's error status), or the error
    # A token that is gone: since when (unix time; APNs' 410 "timestamp"),
    # if the service said. A device registered again after it is kept.
    gone_since: float | None = None


@dataclass(frozen=True, slots=True)
class AnswerRules:
    """How one service words the answers the pusher acts on."""

    unregistered: tuple[int, str]  # the status, or the reason, of a token that is gone
    bad_token: tuple[int, frozenset[str]]  # the status and reasons of a wrong token
    auth: tuple[int, frozenset[str] | None]  # the status (and reasons; None: any) of refused credentials

    def classify(self, status: int, reason: str, gone_since: float | None = None) -> PushAnswer:
        """The service's answer, as the pusher acts on it."""
        if status == 200:
            result = PushResult.SENT
        elif status == self.unregistered[0] or reason == self.unregistered[1]:
            result = PushResult.UNREGISTERED
        elif status == self.bad_token[0] and reason in self.bad_token[1]:
            result = PushResult.BAD_TOKEN
        elif status == self.auth[0] and (self.auth[1] is None or reason in self.auth[1]):
            result = PushResult.AUTH
        elif status == 429 or status >= 500:
            result = PushResult.RETRY  # throttled, or the service failed
        else:
            result = PushResult.FAILED
        return PushAnswer(result, status, reason, gone_since if result is PushResult.UNREGISTERED else None)
