"""What every link to a node or to Redis shares, whatever carries it: the
node's addresses, the backoff between reconnects, and why a command to a
node failed. No I/O here: the connections (evapi_client.py,
redis_client.py, stream_source.py, shared_claims.py), the settings and the
metrics import it alike."""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass

__all__ = ["Backoff", "CommandFailed", "CommandFailure", "NodeAddress"]


@dataclass(frozen=True, slots=True)
class NodeAddress:
    """One Kamailio node: its evapi socket and the SIP address fake calls use."""

    name: str
    evapi_host: str
    evapi_port: int
    sip_host: str
    sip_port: int


class CommandFailure(enum.StrEnum):
    """Why a command failed (the ``reason`` label of commands_failed_total)."""

    NOT_CONNECTED = "not_connected"  # no connection to the node now
    TIMEOUT = "timeout"  # no acknowledgement within evapi.ack_timeout
    REFUSED = "refused"  # Kamailio answered ok: false (its error says why)
    DISCONNECTED = "disconnected"  # the connection closed before the acknowledgement
    STOPPED = "stopped"  # the worker stopped
    TOO_LARGE = "too_large"  # over what one evapi read takes
    BACKLOG = "backlog"  # Kamailio does not read: 4 MiB of commands wait


class CommandFailed(Exception):
    """A command was not acknowledged: not connected, timed out or refused."""

    def __init__(self, reason: CommandFailure, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Backoff:
    """Capped exponential backoff with jitter between reconnect attempts."""

    initial: float = 0.1
    cap: float = 5.0
    factor: float = 2.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Delay before attempt number ``attempt`` (0 for the first retry).

        Half fixed, half random ("equal jitter"): never zero, so a refused
        node is not hammered, and spread out so many workers do not
        reconnect in step after a Kamailio restart.
        """
        ceiling = min(self.cap, self.initial * self.factor ** min(attempt, 32))
        return ceiling / 2 + rng.uniform(0, ceiling / 2)
