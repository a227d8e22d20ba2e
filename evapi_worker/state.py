"""The state file's format: what a snapshot holds and how it is checked.

A snapshot is the engine's records (see :class:`~.engine.EngineState`), the
actions decided but not yet begun when the worker stopped, and two clocks:
the unix time of saving and the engine's (monotonic) clock at that moment.
The engine's clock does not survive a restart, so on load every engine time
is re-based on the new clock through the wall clock: a call that ended 5 s
before a 3 s restart has 7 s of its window left, not 10.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Final

import msgspec

from .engine import Act, EngineState

__all__ = ["STATE_VERSION", "Snapshot", "StateError", "decode_snapshot", "encode_snapshot"]

STATE_VERSION: Final = 2

# No saved time is further from the moment of saving than this (about four
# months): anything else is a damaged file, not a state.
_SPAN: Final = 1e7


class Snapshot(msgspec.Struct, frozen=True):
    version: int
    saved_at: float  # unix time
    clock: float  # the engine's clock when saved
    journal: int  # journal files numbered from this one hold what came after
    engine: EngineState
    actions: list[Act] = []  # decided, not started when the worker stopped

    def rebased(self, offset: float) -> Snapshot:
        """This snapshot with every engine time moved by ``offset`` (onto
        another process's clock)."""
        actions = [dataclasses.replace(a, deadline=a.deadline + offset) for a in self.actions]
        return msgspec.structs.replace(
            self, clock=self.clock + offset, engine=self.engine.shifted(offset), actions=actions
        )


class StateError(Exception):
    """A state file that cannot be used; the worker starts empty instead."""


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Snapshot)


def encode_snapshot(snapshot: Snapshot) -> bytes:
    return _encoder.encode(snapshot)


def decode_snapshot(data: bytes, where: str) -> Snapshot:
    """Decode and check a snapshot; :class:`StateError` says what is wrong."""
    try:
        snapshot = _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise StateError(f"{where}: {exc}") from None
    if snapshot.version != STATE_VERSION:
        raise StateError(f"{where}: state version {snapshot.version}, expected {STATE_VERSION}")
    _check_values(snapshot, where)
    return snapshot


def _check_values(snapshot: Snapshot, where: str) -> None:
    """Values of the right types may still be wrong (a hand-edited or
    damaged file); the worker must start, not crash at every start."""

    def bad(what: str) -> StateError:
        return StateError(f"{where}: {what}")

    def near(value: float) -> bool:
        return math.isfinite(value) and abs(value - snapshot.clock) < _SPAN

    if not math.isfinite(snapshot.saved_at):
        raise bad("saved_at is not a time")
    if not math.isfinite(snapshot.clock):
        raise bad("clock is not a time")
    for c in snapshot.engine.calls:
        if not near(c.expires_at):
            raise bad(f"call {c.call_id!r} expires_at {c.expires_at!r}")
        if c.end_ts is not None and not math.isfinite(c.end_ts):
            raise bad(f"call {c.call_id!r} end_ts {c.end_ts!r}")
    for d in snapshot.engine.devices:
        for name in ("arrived_at", "expires_at"):
            value = getattr(d, name)
            if not near(value):
                raise bad(f"device {d.device!r} {name} {value!r}")
    for a in snapshot.actions:
        if not near(a.deadline):
            raise bad(f"action for {a.call_id!r} deadline {a.deadline!r}")
