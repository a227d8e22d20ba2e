"""What a push service's answer means for the worker, whichever service
it is (APNs, FCM): one vocabulary for the pusher, the metrics and the logs.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["PushAnswer", "PushResult"]


class PushResult(enum.Enum):
    SENT = "sent"  # accepted for delivery
    UNREGISTERED = "unregistered"  # the token is gone (the app was removed): forget it
    BAD_TOKEN = "bad_token"  # the token or its topic is wrong: forget it until it registers again
    AUTH = "auth"  # our credentials were refused (expired or invalid): renew them, try once more
    RETRY = "retry"  # throttled, the service failed, or the connection did: try again later
    FAILED = "failed"  # refused for another reason (payload, configuration): not tried again


@dataclass(frozen=True, slots=True)
class PushAnswer:
    result: PushResult
    status: int  # the HTTP status, 0 when no answer came
    reason: str  # the service's reason (APNs' "reason", FCM's error status), or the error
