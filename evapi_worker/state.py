"""The engine's state on disk, so a restart inside the window loses nothing.

Written at shutdown, read at start. Times are stored relative to the moment
of saving (the engine's clock is monotonic and does not survive a restart);
on load they are re-based on the new clock, minus the time the worker was
down, so a call that ended 5 s before a 3 s restart has 7 s of its window
left, not 10.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Final

import msgspec

from .engine import EndKind, Engine
from .events import CallStarted, Register

__all__ = ["StateError", "load_state", "save_state"]

STATE_VERSION: Final = 1


class _CallState(msgspec.Struct, frozen=True):
    call_id: str
    aor: str
    started: CallStarted | None
    end_ts: float | None
    end: str | None
    end_code: int | None
    expires_in: float
    decided: dict[str, bool] | None
    rang: list[str] | None = None


class _DeviceState(msgspec.Struct, frozen=True):
    reg: Register
    dev: str
    arrived_ago: float
    expires_in: float
    pending: list[str]


class _Snapshot(msgspec.Struct, frozen=True):
    version: int
    saved_at: float  # unix time
    calls: list[_CallState]
    devices: list[_DeviceState]


class StateError(Exception):
    """A state file that cannot be used; the worker starts empty instead."""


def save_state(engine: Engine, now: float, path: Path) -> int:
    """Write the engine's calls and devices; returns how many calls. Atomic:
    a crash while writing leaves the previous file."""
    calls, devices = engine.export_state()
    snapshot = _Snapshot(
        version=STATE_VERSION,
        saved_at=time.time(),
        calls=[
            _CallState(
                c.call_id, c.aor, c.started, c.end_ts, c.end.value if c.end else None, c.end_code,
                c.expires - now, dict(c.decided) if c.decided else None, sorted(c.rang) if c.rang else None,
            )
            for c in calls
        ],
        devices=[
            _DeviceState(d.reg, d.dev, now - d.arrival, d.expires - now, sorted(d.pending)) for d in devices
        ],
    )  # fmt: skip
    tmp = path.with_name(path.name + ".tmp")
    # 0600: the state holds push tokens and phone numbers.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(msgspec.msgpack.encode(snapshot))
    os.replace(tmp, path)
    return len(calls)


def load_state(engine: Engine, now: float, path: Path) -> int:
    """Restore what :func:`save_state` wrote into an empty engine; returns how many calls."""
    try:
        snapshot = msgspec.msgpack.decode(path.read_bytes(), type=_Snapshot)
    except (OSError, msgspec.DecodeError) as exc:
        raise StateError(f"{path}: {exc}") from None
    if snapshot.version != STATE_VERSION:
        raise StateError(f"{path}: state version {snapshot.version}, expected {STATE_VERSION}")
    _check_values(snapshot, path)
    down = max(0.0, time.time() - snapshot.saved_at)
    for c in snapshot.calls:
        engine.import_call(
            c.call_id, c.aor, c.started, c.end_ts, EndKind(c.end) if c.end else None, c.end_code,
            now + c.expires_in - down, c.decided, set(c.rang) if c.rang else None,
        )  # fmt: skip
    for d in snapshot.devices:
        engine.import_device(d.reg, d.dev, now - d.arrived_ago - down, now + d.expires_in - down, set(d.pending))
    return len(snapshot.calls)


# No saved time is further away than this (about four months): anything else
# is a damaged file, not a state.
_SPAN: Final = 1e7


def _check_values(snapshot: _Snapshot, path: Path) -> None:
    """Values of the right types may still be wrong (a hand-edited or
    damaged file); the worker must start, not crash at every start."""
    ends = {kind.value for kind in EndKind}

    def bad(what: str) -> StateError:
        return StateError(f"{path}: {what}")

    if not math.isfinite(snapshot.saved_at):
        raise bad("saved_at is not a time")
    for c in snapshot.calls:
        if c.end is not None and c.end not in ends:
            raise bad(f"call {c.call_id!r} ended as {c.end!r}")
        if not (math.isfinite(c.expires_in) and abs(c.expires_in) < _SPAN):
            raise bad(f"call {c.call_id!r} expires_in {c.expires_in!r}")
        if c.end_ts is not None and not math.isfinite(c.end_ts):
            raise bad(f"call {c.call_id!r} end_ts {c.end_ts!r}")
    for d in snapshot.devices:
        for name in ("arrived_ago", "expires_in"):
            value = getattr(d, name)
            if not (math.isfinite(value) and abs(value) < _SPAN):
                raise bad(f"device {d.dev!r} {name} {value!r}")
