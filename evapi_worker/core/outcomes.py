"""How an action ended: the outcome every fake call and MESSAGE is counted
and logged by (a metric label)."""

from __future__ import annotations

import enum

__all__ = ["Outcome"]


class Outcome(enum.Enum):
    """How one fake call ended (a metric label)."""

    COMPLETED = "completed"  # the device rang and took the CANCEL
    ANSWERED = "answered"  # the device answered; ACK and BYE were sent
    REJECTED = "rejected"  # the device refused the INVITE
    UNREACHABLE = "unreachable"  # the device's TCP/TLS connection was gone (Kamailio's 477)
    TIMEOUT = "timeout"  # no ringing in time; cancelled after Kamailio's 100
    NO_RESPONSE = "no_response"  # nothing came back at all
    GAVE_UP = "gave_up"  # no final response to the CANCEL in time
    KILLED = "killed"  # SIPp was killed: past its time limit, or the worker stopped
    DEFERRED = "deferred"  # not begun when the worker stopped: saved, begun after its restart
    OVERDUE = "overdue"  # dropped: its deadline passed while it waited
    TAKEN = "taken"  # another worker claimed this fake call and sends it
    UNSAFE = "unsafe"  # refused: event data not safe for SIP or for SIPp's twin message
    FAILED = "failed"  # SIPp or the command to Kamailio failed
