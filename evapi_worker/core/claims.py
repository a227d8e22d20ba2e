"""The names every worker gives one fake call, or one push: the same on
every worker, so the first claim on a name wins (on the node, or in Redis).

A call is named by its Call-ID and the account it calls (Call-IDs are the
callers' choice: one can name calls to two accounts), a device by its
identity (devices.py). A digest, so any Call-ID or device name fits
Kamailio's htable keys and Redis keys safely. Pure.
"""

from __future__ import annotations

import hashlib

__all__ = ["claim_key", "push_claim_key"]


def claim_key(call_id: str, aor: str, device: str) -> str:
    """The name of the fake call (or MESSAGE) of ``device`` for the call."""
    return hashlib.sha256(f"{call_id}\n{aor}\n{device}".encode()).hexdigest()[:32]


def push_claim_key(call_id: str, aor: str, device: str) -> str:
    """The name of the push to ``device`` for the call."""
    return hashlib.sha256(f"push\n{call_id}\n{aor}\n{device}".encode()).hexdigest()[:32]
