"""The engine's state on disk while the worker runs, so a crash loses at
most a second of it and never repeats a fake call.

Two kinds of files, side by side:

* the snapshot (``state_file``): the whole state, replaced atomically at
  most once per interval while something changed, and at shutdown;
* journals (``<state_file>.journal.N``): one record per action, appended
  before the action starts. A ``kill -9`` loses the state of the last
  interval, but a restored engine knows every action already begun and never
  begins it again.

Each snapshot names the journal that continues it; older journals are
removed once the snapshot is on disk. Journal writes land in the page cache
(a crashed process cannot lose them); the snapshot is synced before it
replaces the old one, so a power cut leaves the previous one.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgpack

from .engine import Act, Engine
from .state import STATE_VERSION, Snapshot, StateError, decode_snapshot, encode_snapshot

__all__ = ["Restored", "StateStore"]

OnError = Callable[[str, OSError], None]
"""Told of a write that failed: ``("journal" | "snapshot", error)``."""


@dataclass(frozen=True, slots=True)
class Restored:
    calls: int
    devices: int
    actions: list[Act]  # decided, not begun when the worker stopped
    journaled: int  # actions begun after the snapshot, known from journals


class StateStore:
    def __init__(self, path: Path, on_error: OnError) -> None:
        self.path = path
        self._on_error = on_error
        self._journal = 0  # number of the journal written to now
        self._fd: int | None = None
        self._journal_re = re.compile(re.escape(path.name) + r"\.journal\.(\d{1,18})")

    # -- start ----------------------------------------------------------

    def restore(self, engine: Engine, now: float) -> Restored:
        """Load the snapshot and the journals after it into ``engine``
        (empty) whose clock reads ``now``. :class:`StateError` when the
        snapshot cannot be used; the journals are read in any case."""
        journals = self._journals()
        # Never append to a journal an earlier run wrote: start after them all.
        self._journal = max((n for n, _ in journals), default=0) + 1
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return Restored(0, 0, [], 0)
        except OSError as exc:
            raise StateError(f"{self.path}: {exc.strerror or exc}") from None
        snapshot = decode_snapshot(data, str(self.path)).rebased(now)
        # Journals the snapshot points to are read below: write after them.
        self._journal = max(self._journal, snapshot.journal + 1)
        engine.import_state(snapshot.engine)
        journaled = 0
        for number, path in journals:
            if number >= snapshot.journal:
                for call_id, device in _read_journal(path):
                    journaled += engine.mark_decided(call_id, device)
        return Restored(len(snapshot.engine.calls), len(snapshot.engine.devices), snapshot.actions, journaled)

    def set_aside(self) -> Path:
        """Move an unusable snapshot out of the way (it would fail again at
        every start); returns where it went."""
        aside = self.path.with_name(self.path.name + ".bad")
        os.replace(self.path, aside)
        return aside

    # -- while running -----------------------------------------------------

    def note_action(self, call_id: str, device: str) -> None:
        """Record, before it begins, that an action for (call, device) begins."""
        try:
            if self._fd is None:
                self._fd = os.open(
                    self._journal_path(self._journal), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
                )
            os.write(self._fd, msgpack.packb((call_id, device)))
        except OSError as exc:
            self._on_error("journal", exc)

    def snapshot(self, engine: Engine, now: float, actions: list[Act] | None = None) -> tuple[bytes, int]:
        """Take a snapshot now and start a new journal for what follows;
        :meth:`write` puts it on disk (in a thread, if need be)."""
        self._close_journal()
        self._journal += 1
        snap = Snapshot(STATE_VERSION, time.time(), now, self._journal, engine.export_state(), actions or [])
        return encode_snapshot(snap), self._journal

    def write(self, data: bytes, journal: int) -> bool:
        """Replace the snapshot file atomically, then remove the journals
        before ``journal`` (now in the snapshot). False when it failed."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
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
        for number, path in self._journals():
            if number < journal:
                try:
                    path.unlink()
                except OSError as exc:
                    self._on_error("journal", exc)
        return True

    def close(self) -> None:
        self._close_journal()

    # -- files ---------------------------------------------------------------

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


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_journal(path: Path) -> list[tuple[str, str]]:
    """The (call, device) records of one journal; a torn last record (a
    crash in the middle of a write) and anything malformed end the reading."""
    try:
        data = path.read_bytes()
    except OSError:
        return []
    out: list[tuple[str, str]] = []
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=len(data) + 1)
    unpacker.feed(data)
    try:
        for record in unpacker:
            if not (isinstance(record, list) and len(record) == 2 and all(isinstance(v, str) for v in record)):
                break
            out.append((record[0], record[1]))
    except ValueError:  # msgpack's format errors (FormatError, StackError, ExtraData)
        pass
    return out
