"""The engine's state on disk while the worker runs, so a crash loses at
most a second of it and never repeats a fake call.

A write-ahead journal and snapshots that compact it, side by side:

* journals (``<state_file>.journal.N``): every event the engine took, with
  its receive time, written in batches at least every ``state_interval``;
  and one record per action, written before the action begins. A
  ``kill -9`` loses the events of the last interval at most, and a restored
  engine knows every action already begun and never begins it again;
* the snapshot (``state_file``): the whole state, written when the journal
  has grown past the last snapshot's size, and at shutdown (with the
  actions that had not begun). It names the first journal it does not
  contain; older journals are removed once it is on disk.

Restoring reads the snapshot, then feeds the journals' events to the engine
again: the engine is deterministic, so it ends where the old one was. Times
are re-based through the wall clock: an engine's clock is monotonic and
starts anew with each process.

Journal writes land in the page cache (a crashed process cannot lose them);
snapshots are synced before they replace the old one, so a power cut leaves
the previous one.
"""

from __future__ import annotations

import gc
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import msgpack
import msgspec

from .engine import Act, Engine
from .state import STATE_VERSION, Snapshot, StateError, decode_snapshot, encode_snapshot

__all__ = ["Restored", "StateStore"]

OnError = Callable[[str, OSError], None]
"""Told of a write that failed: ``("journal" | "snapshot", error)``."""

Replay = Callable[[str, bytes, float], None]
"""Feeds one journaled event (node, payload, engine time) to the engine."""

# Journal records, each a msgpack array whose first item says what it is.
_CLOCK: Final = "w"  # ["w", wall clock minus engine clock]: first in every journal
_EVENTS: Final = "e"  # ["e", [[node, engine time, payload], ...]]: a batch of events
_ACTION: Final = "a"  # ["a", call_id, device]: an action begins

# Compact once the journals since the last snapshot outgrow it, or this.
_MIN_COMPACT: Final = 1 << 20


@dataclass(frozen=True, slots=True)
class Restored:
    calls: int  # from the snapshot
    events: int  # journaled events fed to the engine again
    actions_begun: int  # journaled actions
    deferred: list[Act]  # decided, not begun when the worker stopped


class StateStore:
    def __init__(self, path: Path, wall_offset: float, on_error: OnError) -> None:
        """``wall_offset``: the wall clock minus the engine's clock."""
        self.path = path
        self._wall_offset = wall_offset
        self._on_error = on_error
        self._journal = 0  # number of the journal written to now
        self._fd: int | None = None
        self._events: list[tuple[str, float, bytes]] = []
        self._journal_bytes = 0  # written since the last snapshot
        self._snapshot_bytes = 0
        self._journal_re = re.compile(re.escape(path.name) + r"\.journal\.(\d{1,18})")

    # -- start ----------------------------------------------------------

    def restore(self, engine: Engine, now: float, replay: Replay) -> Restored:
        """Load the snapshot and the journals after it into ``engine``
        (empty) whose clock reads ``now``; journaled events go through
        ``replay``. :class:`StateError` when the snapshot cannot be used (the
        engine is left empty)."""
        journals = self._journals()
        # Never append to a journal an earlier run wrote: start after them all.
        self._journal = max((n for n, _ in journals), default=0) + 1
        first, calls, deferred = 0, 0, []
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            data = None
        except OSError as exc:
            raise StateError(f"{self.path}: {exc.strerror or exc}") from None
        if data is not None:
            snapshot = decode_snapshot(data, str(self.path))
            snapshot = snapshot.rebased(snapshot.saved_at - snapshot.clock - self._wall_offset)
            self._journal = max(self._journal, snapshot.journal + 1)
            engine.import_state(snapshot.engine)
            first, calls, deferred = snapshot.journal, len(snapshot.engine.calls), snapshot.actions
            self._snapshot_bytes = len(data)
        events = begun = 0
        for number, path in journals:
            if number >= first:
                e, b = self._replay(path, engine, replay)
                events, begun = events + e, begun + b
        return Restored(calls, events, begun, deferred)

    def set_aside(self) -> Path:
        """Move an unusable snapshot out of the way (it would fail again at
        every start); returns where it went."""
        aside = self.path.with_name(self.path.name + ".bad")
        os.replace(self.path, aside)
        return aside

    def _replay(self, path: Path, engine: Engine, replay: Replay) -> tuple[int, int]:
        offset: float | None = None
        events = begun = 0
        for record in _read_records(path):
            kind = record[0] if record else None
            if kind == _CLOCK and len(record) == 2 and isinstance(record[1], float):
                offset = record[1] - self._wall_offset
            elif offset is None:
                break  # no clock: nothing after can be placed in time
            elif kind == _EVENTS and len(record) == 2 and isinstance(record[1], list):
                for item in record[1]:
                    if _is_event(item):
                        replay(item[0], item[2], item[1] + offset)
                        events += 1
            elif kind == _ACTION and len(record) == 3 and isinstance(record[1], str) and isinstance(record[2], str):
                engine.mark_decided(record[1], record[2])
                begun += 1
        return events, begun

    # -- while running -----------------------------------------------------

    def note_event(self, node: str, now: float, payload: bytes) -> None:
        """An event the engine took at ``now``; written at the next :meth:`flush`."""
        self._events.append((node, now, payload))

    def note_action(self, call_id: str, device: str) -> None:
        """Record, before it begins, that an action for (call, device) begins
        (with every event before it)."""
        self._write(self._pending() + _encode([_ACTION, call_id, device]))

    def flush(self) -> None:
        """Write the events noted since the last flush."""
        if self._events:
            self._write(self._pending())

    @property
    def wants_snapshot(self) -> bool:
        """Whether the journals outgrew the last snapshot."""
        return self._journal_bytes > max(_MIN_COMPACT, self._snapshot_bytes)

    def snapshot(self, engine: Engine, now: float, actions: list[Act] | None = None) -> Snapshot:
        """Take a snapshot now (write it with :meth:`write`, in a thread if
        need be) and start a new journal for what follows."""
        self.flush()
        self._close_journal()
        self._journal += 1
        self._journal_bytes = 0
        # A snapshot allocates a record per call and device, all acyclic: the
        # cycle collector would only rescan them.
        enabled = gc.isenabled()
        gc.disable()
        try:
            state = engine.export_state()
        finally:
            if enabled:
                gc.enable()
        return Snapshot(STATE_VERSION, now + self._wall_offset, now, self._journal, state, actions or [])

    def write(self, snapshot: Snapshot) -> bool:
        """Encode ``snapshot`` and replace the file atomically, then remove
        the journals it contains. False when it failed."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            data = encode_snapshot(snapshot)
            # 0600: the state holds push tokens and phone numbers.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError as exc:
            self._on_error("snapshot", exc)
            return False
        self._snapshot_bytes = len(data)
        for number, path in self._journals():
            if number < snapshot.journal:
                try:
                    path.unlink()
                except OSError as exc:
                    self._on_error("journal", exc)
        return True

    def close(self) -> None:
        self.flush()
        self._close_journal()

    # -- files ---------------------------------------------------------------

    def _pending(self) -> bytes:
        if not self._events:
            return b""
        events, self._events = self._events, []
        return _encode([_EVENTS, events])

    def _write(self, data: bytes) -> None:
        try:
            if self._fd is None:
                path = self._journal_path(self._journal)
                self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
                data = _encode([_CLOCK, self._wall_offset]) + data
            _write_all(self._fd, data)
            self._journal_bytes += len(data)
        except OSError as exc:
            self._on_error("journal", exc)

    def _close_journal(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.close(fd)
            except OSError as exc:
                self._on_error("journal", exc)

    def _journal_path(self, number: int) -> Path:
        return self.path.with_name(f"{self.path.name}.journal.{number}")

    def _journals(self) -> list[tuple[int, Path]]:
        try:
            names = os.listdir(self.path.parent)
        except OSError:
            return []
        matches = (self._journal_re.fullmatch(name) for name in names)
        return sorted((int(m.group(1)), self.path.parent / m.group(0)) for m in matches if m)


_encode = msgspec.msgpack.Encoder().encode


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _is_event(item: object) -> bool:
    return (
        isinstance(item, list)
        and len(item) == 3
        and isinstance(item[0], str)
        and isinstance(item[1], float)
        and isinstance(item[2], bytes)
    )


def _read_records(path: Path) -> list[list[object]]:
    """The records of one journal; a torn last record (a crash in the middle
    of a write) and anything malformed end the reading."""
    try:
        data = path.read_bytes()
    except OSError:
        return []
    out: list[list[object]] = []
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=len(data) + 1)
    unpacker.feed(data)
    try:
        for record in unpacker:
            if not isinstance(record, list):
                break
            out.append(record)
    except ValueError:  # msgpack's format errors (FormatError, StackError, ExtraData)
        pass
    return out
