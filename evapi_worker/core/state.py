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
from .push_book import PushDevice

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
    actions: list[Act] = []  # decided, not begun when the snapshot was taken
    push_devices: list[PushDevice] = []  # whom to push when a call starts
    positions: dict[str, str] = {}  # node -> the last entry of its Redis stream handled

    def rebased(self, offset: float) -> Snapshot:
        """This snapshot with every engine time moved by ``offset`` (onto
        another process's clock)."""
        actions = [dataclasses.replace(a, deadline=a.deadline + offset) for a in self.actions]
        pushes = [msgspec.structs.replace(d, expires_at=d.expires_at + offset) for d in self.push_devices]
        return msgspec.structs.replace(
            self, clock=self.clock + offset, engine=self.engine.shifted(offset), actions=actions,
            push_devices=pushes,
        )  # fmt: skip


class StateError(Exception):
    """A state file that cannot be used; the worker starts empty instead."""


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Snapshot)


def encode_snapshot(snapshot: Snapshot) -> bytes:
    return _encoder.encode(snapshot)


def decode_snapshot(data: bytes, where: str) -> tuple[Snapshot, int]:
    """Decode and check a snapshot: the snapshot without its unsound
    records, and how many were dropped. :class:`StateError` says what is
    wrong with a file that cannot be used at all."""
    try:
        snapshot = _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise StateError(f"{where}: {exc}") from None
    if snapshot.version != STATE_VERSION:
        raise StateError(f"{where}: state version {snapshot.version}, expected {STATE_VERSION}")
    return _keep_sound(snapshot, where)


def _keep_sound(snapshot: Snapshot, where: str) -> tuple[Snapshot, int]:
    """Values of the right types may still be wrong (a hand-edited or
    damaged file): every time must be finite and near the moment of saving.
    A record with one that is not is dropped; the worker must start, not
    crash at every start."""

    def near(value: float) -> bool:
        return math.isfinite(value) and abs(value - snapshot.clock) < _SPAN

    if not math.isfinite(snapshot.saved_at):
        raise StateError(f"{where}: saved_at is not a time")
    if not math.isfinite(snapshot.clock):
        raise StateError(f"{where}: clock is not a time")
    engine = snapshot.engine
    calls = [c for c in engine.calls if near(c.expires_at) and (c.end_ts is None or math.isfinite(c.end_ts))]
    devices = [d for d in engine.devices if near(d.arrived_at) and near(d.expires_at)]
    actions = [a for a in snapshot.actions if near(a.deadline)]
    pushes = [d for d in snapshot.push_devices if near(d.expires_at)]
    dropped = (
        len(engine.calls) - len(calls) + len(engine.devices) - len(devices) + len(snapshot.actions) - len(actions)
        + len(snapshot.push_devices) - len(pushes)
    )  # fmt: skip
    if not dropped:
        return snapshot, 0
    sound = msgspec.structs.replace(snapshot, engine=EngineState(calls, devices), actions=actions, push_devices=pushes)
    return sound, dropped
