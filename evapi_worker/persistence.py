"""The engine's state on disk while the worker runs, so a crash loses at
most a second of it and never repeats a fake call.

A write-ahead journal and snapshots that compact it, side by side:

* journals (``<state_file>.journal.N``): every event the engine took, with
  its receive time, written in batches at least every ``state_interval``;
  one record per push a provider accepted (its device is answered from
  it); and one record per action, written when the action begins (just
  before its pin or MESSAGE goes to Kamailio). A ``kill -9`` loses the events of
  the last interval at most; a restored engine knows every action already
  begun and never begins it again;
* the snapshot (``state_file``): the whole state and the actions decided
  but not begun, written when the journal has grown past the last
  snapshot's size, and at shutdown. It names the first journal it does not
  contain; older journals are removed once it is on disk.

Restoring reads the snapshot, then feeds the journals' events to the engine
again: the engine is deterministic, so it ends where the old one was, and
makes again the decisions the old one made. Those actions, and the
snapshot's, that the journals do not say began are handed back to begin
(or to be counted overdue): a fake call waiting for a SIPp slot when the
worker died is still made. Those that began are handed back too, to be
tried again as retries: the node's claim lets one through only if the
first attempt's pin was never used, so none is lost and none repeated. Times are re-based through the wall clock: an
engine's clock is monotonic and starts anew with each process.

Journal records are framed (a mark, the length, a CRC-32): a damaged or
torn record is skipped and counted, and reading goes on at the next mark.
Every value read is checked before it reaches the engine (a time is finite
and near the present): nothing on disk can stop the worker from starting.

The event path only notes events: the service takes what was noted and
appends it in a thread (:meth:`StateStore.take`, :meth:`StateStore.append`),
so a slow disk holds up no event. Journal writes land in the page cache (a
crashed process cannot lose them); snapshots are synced before they replace
the old one, so a power cut leaves the previous one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import gc
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import msgpack
import trio

from .core.clocks import NodeClocks
from .core.engine import Act, Decision, Engine
from .core.push_book import PushBook
from .core.records import (
    ACTION,
    CLOCK,
    EVENTS,
    FILE_CLOCK,
    JOURNAL_MAGIC,
    POSITIONS,
    PUSHED,
    clock_record,
    event_item,
    finite_number,
    frame,
    pushed_record,
)
from .core.state import STATE_VERSION, Snapshot, StateError, decode_snapshot, encode_snapshot
from .files import FileProblem, open_regular, read_regular
from .record_log import LogFile, read_log, write_all

__all__ = ["MAX_JOURNALS", "MAX_SNAPSHOT", "Restored", "StateKeeper", "StateStore"]

OnError = Callable[[str, OSError], None]
"""Told of a write that failed: ``("journal" | "snapshot", error)``."""

OnDropped = Callable[[Path, int], None]
"""Told of a journal removed to keep the journals within their bound (path, bytes)."""

Replay = Callable[[str, bytes, float], Sequence[Decision]]
"""Feeds one journaled event (node, payload, engine time) to the engine;
returns what the engine decided."""

# Journal records (core/records.py): the file's clock first, then events
# in batches, actions as they begin, pushes accepted, nodes' clocks
# measured, Redis stream positions.
# A Redis stream entry id: milliseconds, a dash, a sequence number.
_ENTRY_ID: Final = re.compile(r"\d{1,20}-\d{1,20}")

# Compact once the journals since the last snapshot outgrow it, or this.
_MIN_COMPACT: Final = 1 << 20
# The journals on disk, in all (the oldest are removed past it), and the
# largest snapshot read: bounds on what a start reads.
MAX_JOURNALS: Final = 32 << 20
MAX_SNAPSHOT: Final = 1 << 30

# No journaled time is further from the moment of restoring than this
# (about four months): anything else is damage, not a time.
_SPAN: Final = 1e7


@dataclass(slots=True)
class _Tally:
    waiting: dict[tuple[str, str, str], Act]  # decided, by (Call-ID, account, device)
    begun: set[tuple[str, str, str]] = dataclasses.field(default_factory=set)
    events: int = 0
    skipped: int = 0
    positions: dict[str, str] = dataclasses.field(default_factory=dict)
    problems: list[str] = dataclasses.field(default_factory=list)  # journals that could not be read


@dataclass(frozen=True, slots=True)
class Restored:
    calls: int  # from the snapshot
    events: int  # journaled events fed to the engine again
    actions_begun: int  # journaled actions
    deferred: list[Act]  # decided, never begun: to begin now (or be overdue)
    skipped: int = 0  # damaged journal records and values, skipped
    # Begun, their end unknown (the worker died meanwhile): to try again,
    # as a retry the node refuses if the first attempt's INVITE came.
    in_doubt: list[Act] = dataclasses.field(default_factory=list)
    snapshot_error: str | None = None  # the snapshot could not be used at all
    dropped: int = 0  # snapshot records with impossible values, skipped
    # The last entry handled of each node's Redis stream, to read on from.
    positions: dict[str, str] = dataclasses.field(default_factory=dict)
    problems: list[str] = dataclasses.field(default_factory=list)  # journals that could not be read, why


class StateStore:
    def __init__(self, path: Path, wall_offset: float, on_error: OnError, on_dropped: OnDropped | None = None) -> None:
        """``wall_offset``: the wall clock minus the engine's clock."""
        self.path = path
        self._wall_offset = wall_offset
        self._on_error = on_error
        self._on_dropped = on_dropped or (lambda _path, _size: None)
        self._journal = 0  # number of the journal written to now
        self._log: LogFile | None = None
        self._events: list[tuple[str, float, bytes]] = []
        self._queued: list[bytes] = []  # framed records not yet written, in order
        self._positions: dict[str, str] = {}  # node -> last stream entry handled
        self._positions_moved = False
        self._journal_bytes = 0  # written since the last snapshot
        self._snapshot_bytes = 0
        self._journal_re = re.compile(re.escape(path.name) + r"\.journal\.(\d{1,18})")

    # -- start ----------------------------------------------------------

    def restore(
        self,
        engine: Engine,
        now: float,
        replay: Replay,
        book: PushBook | None = None,
        clocks: NodeClocks | None = None,
    ) -> Restored:
        """Load the snapshot and the journals after it into ``engine``
        (empty) whose clock reads ``now``; journaled events go through
        ``replay``, the nodes' clocks measured meanwhile reach ``clocks``
        between them, as they did live. A snapshot that cannot be used at
        all is reported in :attr:`Restored.snapshot_error` (set it aside);
        the journals are read all the same."""
        journals = self._journals()
        # Never append to a journal an earlier run wrote: start after them all.
        self._journal = max((n for n, _ in journals), default=0) + 1
        first, calls, dropped, error = 0, 0, 0, None
        waiting: dict[tuple[str, str, str], Act] = {}
        snapshot: Snapshot | None = None
        try:
            data = read_regular(self.path, MAX_SNAPSHOT, own=True)
            snapshot, dropped = decode_snapshot(data, str(self.path))
        except FileNotFoundError:
            pass
        except FileProblem as exc:
            error = str(exc)
        except OSError as exc:
            error = f"{self.path}: {exc.strerror or exc}"
        except StateError as exc:
            error = str(exc)
        if snapshot is not None:
            snapshot = snapshot.rebased(snapshot.saved_at - snapshot.clock - self._wall_offset)
            self._journal = max(self._journal, snapshot.journal + 1)
            engine.import_state(snapshot.engine)
            if book is not None:
                book.load(snapshot.push_devices)
            first, calls = snapshot.journal, len(snapshot.engine.calls)
            waiting = {(a.call_id, a.aor, a.device): a for a in snapshot.actions}
            self._snapshot_bytes = len(data)
        tally = _Tally(waiting)
        if snapshot is not None:
            tally.positions.update(_sound_positions(snapshot.positions))
        for number, path in journals:
            if number >= first:
                self._replay(path, engine, replay, now, tally, clocks)
        deferred = [act for key, act in tally.waiting.items() if key not in tally.begun]
        in_doubt = [act for key, act in tally.waiting.items() if key in tally.begun]
        self._positions = dict(tally.positions)
        return Restored(
            calls, tally.events, len(tally.begun), deferred, tally.skipped, in_doubt, error, dropped, tally.positions,
            tally.problems,
        )  # fmt: skip

    def set_aside(self) -> Path:
        """Move an unusable snapshot out of the way (it would fail again at
        every start); returns where it went."""
        aside = self.path.with_name(self.path.name + ".bad")
        os.replace(self.path, aside)
        return aside

    def _replay(
        self, path: Path, engine: Engine, replay: Replay, now: float, tally: _Tally, clocks: NodeClocks | None
    ) -> None:
        try:
            self._replay_records(_read_records(path), engine, replay, now, tally, clocks)
        except OSError as exc:  # not a regular file of ours, too large, unreadable: skipped, said
            tally.skipped += 1
            tally.problems.append(str(exc) if isinstance(exc, FileProblem) else f"{path}: {exc.strerror or exc}")

    def _replay_records(
        self,
        records: Iterator[list[object] | None],
        engine: Engine,
        replay: Replay,
        now: float,
        tally: _Tally,
        clocks: NodeClocks | None,
    ) -> None:
        offset: float | None = None  # the journal's clock minus this one
        for record in records:
            if record is None:
                tally.skipped += 1
                continue
            kind = record[0] if record else None
            if kind == FILE_CLOCK and len(record) == 2 and finite_number(record[1]):
                offset = record[1] - self._wall_offset
            elif kind == EVENTS and len(record) == 2 and isinstance(record[1], list):
                for item in record[1]:
                    when = _event_time(item, offset, now)
                    if when is None:
                        tally.skipped += 1  # damaged, or no clock to place it in time
                        continue
                    assert isinstance(item, list)
                    for decision in replay(item[0], item[2], when):
                        if isinstance(decision, Act):
                            tally.waiting[(decision.call_id, decision.aor, decision.device)] = decision
                    tally.events += 1
            elif kind == ACTION and _action_record(record):
                call_id, device = str(record[1]), str(record[2])
                aor = str(record[3]) if len(record) == 4 else None
                engine.mark_decided(call_id, device, aor)
                if aor is not None:
                    tally.begun.add((call_id, aor, device))
                else:  # every call with that Call-ID, as the engine marked it
                    tally.begun.update(key for key in tally.waiting if key[0] == call_id and key[2] == device)
            elif kind == PUSHED and (pushed := _pushed_record(record, offset, now)) is not None:
                when, call_id, aor, device, lasts = pushed
                engine.pushed(call_id, aor, device, lasts, when)
            elif kind == CLOCK and (clock := _clock_record(record, offset, now)) is not None:
                if clocks is not None:
                    node, node_minus_wall, uncertainty, when = clock
                    clocks.measured(node, node_minus_wall + self._wall_offset, uncertainty, when)
            elif kind == POSITIONS and len(record) == 2 and isinstance(record[1], dict):
                tally.positions.update(_sound_positions(record[1]))
            else:
                tally.skipped += 1

    # -- while running -----------------------------------------------------

    # The event path only notes: the service takes what was noted (cheap,
    # no I/O) and appends it to the journal in a thread.

    def note_event(self, node: str, now: float, payload: bytes) -> None:
        """An event the engine took at ``now``; in the next :meth:`take`."""
        self._events.append((node, now, payload))

    def note_action(self, call_id: str, aor: str, device: str) -> None:
        """The action for (call, device) begins now: its record, after every
        event before it, is in the next :meth:`take`; it must be appended
        before anything of the action reaches Kamailio."""
        self._queued.append(self._pending() + frame([ACTION, call_id, device, aor]))

    def note_push(self, call_id: str, aor: str, device: str, lasts: float, now: float) -> None:
        """A push for (call, device) was accepted at ``now`` and may be
        delivered ``lasts`` seconds later; in the next :meth:`take`, after
        every event before it."""
        self._queued.append(self._pending() + frame([PUSHED, now, call_id, aor, device, lasts]))

    def note_clock(self, node: str, offset: float, uncertainty: float, now: float) -> None:
        """``node``'s clock was measured at ``now``: ``offset``, its clock
        minus the engine's; in the next :meth:`take`, after every event
        before it (the REGISTERs after it are placed with it)."""
        record = [CLOCK, now, node, offset - self._wall_offset, uncertainty]
        self._queued.append(self._pending() + frame(record))

    def note_position(self, node: str, entry_id: str) -> None:
        """``node``'s Redis stream was read up to ``entry_id`` (with every
        event noted before); in the next :meth:`take`."""
        self._positions[node] = entry_id
        self._positions_moved = True

    def take(self) -> bytes:
        """Everything noted since the last take, framed, in order."""
        if self._events:
            self._queued.append(self._pending())
        if self._positions_moved:
            # After the events: a position never runs ahead of them on disk.
            self._queued.append(frame([POSITIONS, dict(self._positions)]))
            self._positions_moved = False
        data = b"".join(self._queued)
        self._queued.clear()
        return data

    def append(self, data: bytes) -> None:
        """Append taken records to the journal (a thread may do it; one
        at a time, never beside :meth:`snapshot`). Errors go to
        ``on_error``."""
        if data:
            self._write(data)

    def flush(self) -> None:
        """Take and append at once."""
        self.append(self.take())

    @property
    def wants_snapshot(self) -> bool:
        """Whether the journals outgrew the last snapshot (or half their bound)."""
        return self._journal_bytes > max(_MIN_COMPACT, min(self._snapshot_bytes, MAX_JOURNALS // 2))

    def snapshot(
        self, engine: Engine, now: float, actions: list[Act] | None = None, book: PushBook | None = None
    ) -> Snapshot:
        """Take a snapshot now (write it with :meth:`write`, in a thread if
        need be) and start a new journal for what follows."""
        self.flush()
        self._close_journal()
        self._journal += 1
        self._journal_bytes = 0
        self._bound_journals()
        # A snapshot allocates a record per call and device, all acyclic: the
        # cycle collector would only rescan them.
        enabled = gc.isenabled()
        gc.disable()
        try:
            state = engine.export_state()
        finally:
            if enabled:
                gc.enable()
        pushes = book.export() if book is not None else []
        return Snapshot(
            STATE_VERSION, now + self._wall_offset, now, self._journal, state, actions or [], pushes,
            dict(self._positions),
        )  # fmt: skip

    def write(self, snapshot: Snapshot) -> bool:
        """Encode ``snapshot`` and replace the file atomically, then remove
        the journals it contains. False when it failed."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            data = encode_snapshot(snapshot)
            # A new file (what a crash left there is removed; a link is
            # removed, never followed). 0600: the state holds push tokens
            # and phone numbers.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            fd = open_regular(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                write_all(fd, data)
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
        return frame([EVENTS, events])

    def _write(self, data: bytes) -> None:
        try:
            if self._log is None:
                try:
                    self._log = self._open_journal()
                except FileProblem as exc:
                    # Something not ours is there (a link, a FIFO): never
                    # written through; said, and the next number taken.
                    self._on_error("journal", exc)
                    self._journal += 1
                    self._log = self._open_journal()
            self._log.append(data)
            self._journal_bytes += len(data)
        except OSError as exc:
            self._on_error("journal", exc)

    def _open_journal(self) -> LogFile:
        path = self._journal_path(self._journal)
        log = LogFile(path, JOURNAL_MAGIC, frame([FILE_CLOCK, self._wall_offset]))
        self._journal_bytes += log.size
        return log

    def _close_journal(self) -> None:
        if self._log is not None:
            log, self._log = self._log, None
            try:
                log.close()
            except OSError as exc:
                self._on_error("journal", exc)

    def _bound_journals(self) -> None:
        """Keep the journals on disk within :data:`MAX_JOURNALS` bytes: when
        snapshots fail (a full disk, a path that cannot be written) they
        would pile up, and a restart would read them all. The oldest go
        first, each told to ``on_dropped``."""
        sizes = []
        for number, path in self._journals():
            if number < self._journal:
                try:
                    sizes.append((number, path, os.lstat(path).st_size))
                except OSError:
                    continue
        total = sum(size for _, _, size in sizes)
        for _, path, size in sizes:
            if total <= MAX_JOURNALS:
                break
            try:
                path.unlink()
            except OSError as exc:
                self._on_error("journal", exc)
                continue
            total -= size
            self._on_dropped(path, size)

    def _journal_path(self, number: int) -> Path:
        return self.path.with_name(f"{self.path.name}.journal.{number}")

    def _journals(self) -> list[tuple[int, Path]]:
        try:
            names = os.listdir(self.path.parent)
        except OSError:
            return []
        matches = (self._journal_re.fullmatch(name) for name in names)
        return sorted((int(m.group(1)), self.path.parent / m.group(0)) for m in matches if m)


def _sound_positions(value: Mapping[Any, object]) -> dict[str, str]:
    """The entries of a positions record that are a node and an entry id."""
    return {
        node: entry
        for node, entry in value.items()
        if isinstance(node, str) and isinstance(entry, str) and _ENTRY_ID.fullmatch(entry)
    }


def _action_record(record: list[object]) -> bool:
    """``["a", call_id, device]`` or ``["a", call_id, device, aor]``, strings."""
    return len(record) in (3, 4) and all(isinstance(value, str) for value in record[1:])


def _pushed_record(record: list[object], offset: float | None, now: float) -> tuple[float, str, str, str, float] | None:
    """A push record's (time on the new clock, call_id, aor, device,
    seconds), or None when it is not one."""
    pushed = pushed_record(record)
    if pushed is None or offset is None or pushed.lasts is None:
        return None
    when = pushed.at + offset
    if abs(when - now) >= _SPAN:
        return None
    return when, pushed.call_id, pushed.aor, pushed.device, pushed.lasts


def _clock_record(record: list[object], offset: float | None, now: float) -> tuple[str, float, float, float] | None:
    """A clock record's (node, node's clock minus the wall clock,
    uncertainty, time on the new clock), or None when it is not one."""
    clock = clock_record(record)
    if clock is None or offset is None:
        return None
    when = clock.at + offset
    if abs(when - now) >= _SPAN or abs(clock.offset) >= _SPAN:
        return None
    return clock.node, clock.offset, clock.uncertainty, when


def _event_time(item: object, offset: float | None, now: float) -> float | None:
    """A journaled event's time on the new clock; None when the item is
    not a well-formed event record or its time cannot be one."""
    event = event_item(item)
    if event is None or offset is None:
        return None
    when = event[1] + offset
    return when if abs(when - now) < _SPAN else None


def _read_records(path: Path) -> Iterator[list[object] | None]:
    """The records of one journal, None for each damaged stretch (a torn
    last record, bytes that are no record, a record that is not a list),
    read as they are needed. A journal gone meanwhile has none; one that is
    not a regular file of this user's, or is larger than all journals may
    be, raises OSError."""
    try:
        magic, records = read_log(path, own=True, limit=MAX_JOURNALS)
    except FileNotFoundError:
        return iter(())
    if magic == JOURNAL_MAGIC:
        return records
    if magic:  # another log (a capture) named as a journal
        raise FileProblem(errno.EINVAL, path, "is a capture, not a journal")
    return iter(_read_unframed(read_regular(path, MAX_JOURNALS, own=True)))


def _read_unframed(data: bytes) -> list[list[object] | None]:
    """A journal from before framing: msgpack records back to back, read
    up to the first that is damaged (msgpack's streaming reader: msgspec
    reads one whole value at a time)."""
    out: list[list[object] | None] = []
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=len(data) + 1)
    unpacker.feed(data)
    try:
        for record in unpacker:
            out.append(record if isinstance(record, list) else None)
            if out[-1] is None:
                break
    except ValueError:
        out.append(None)
    return out


class StateKeeper:
    """The running worker's tasks around its :class:`StateStore`: the
    journal appended at least every ``interval`` (at once when asked), in
    a thread, one append at a time and never beside a snapshot; a
    snapshot when the journals outgrew the last one, and at stop."""

    def __init__(
        self,
        store: StateStore,
        engine: Engine,
        book: PushBook | None,
        interval: float,
        waiting: Callable[[], list[Act]],
    ) -> None:
        self.store = store
        self._engine = engine
        self._book = book
        self._interval = interval
        self._waiting = waiting  # actions decided, not begun: kept in a snapshot
        self._snapshot_lock = trio.Lock()
        self._journal_io = trio.Lock()
        self._soon = trio.Event()

    def soon(self) -> None:
        """Append what was noted now, not at the next interval (a late
        REGISTER, a push accepted: a crash soon after must not lose them)."""
        self._soon.set()

    async def run(self) -> None:
        while True:
            with trio.move_on_after(self._interval):
                await self._soon.wait()
            self._soon = trio.Event()
            await self.append()
            if self.store.wants_snapshot:
                await self.save(self._waiting())

    async def append(self) -> None:
        """Append what was noted to the journal, in a thread: a slow or
        failing disk never holds up the events."""
        async with self._journal_io:
            data = self.store.take()
            if data:
                await trio.to_thread.run_sync(self.store.append, data)

    async def action_begins(self, act: Act) -> None:
        """An action begins: its record (and every event before it) is in
        the page cache before anything of it reaches Kamailio, so a crash
        never begins it twice."""
        self.store.note_action(act.call_id, act.aor, act.device)
        await self.append()

    async def save(self, deferred: list[Act] | None = None) -> bool:
        """A snapshot, with the actions ``deferred``; False when it failed."""
        store = self.store
        async with self._snapshot_lock:
            async with self._journal_io:
                await trio.to_thread.run_sync(store.append, store.take())
                # What came meanwhile (a few events) is written by snapshot() itself.
                snapshot = store.snapshot(self._engine, trio.current_time(), deferred, self._book)
            # Encoding and writing in a thread: the records are immutable.
            return await trio.to_thread.run_sync(store.write, snapshot)
