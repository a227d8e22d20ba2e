"""Capture files: every frame Kamailio sent, the pushes the worker had
accepted and the nodes' clocks it measured, as a record log.

A capture is a record log (core/records.py, the journal's encoding):
``evapi-worker capture 3`` and framed, checksummed records, on the wall
clock::

    ["w", 0.0]                                            the file's clock: the wall clock
    ["f", [[node, seq or None, received, payload], ...]]  frames read, up to 256 a record
    ["u", sent, call_id, aor, device, seconds, provider]  a push the provider accepted
    ["c", measured, node, node's clock minus wall, uncertainty]  a node's clock measured

The push notes let a replay measure how long each phone took to wake after
its push, and judge a pushed device's REGISTER as the live worker did (its
deadline counts from the push); the clock notes let it place REGISTER times
as the live worker did. One damaged record costs only itself (at most 256
frames: a CRC and a decode per frame would make reading three times
slower); reading goes on at the next. Captures of versions 1 and 2 (msgpack records back to back)
and the worker's journals are read too.

Records are appended and flushed in batches, so a file can be read while it
is written, and after a crash. The writer rotates files by size and age and
keeps a bounded number of them.

Capture never slows the reader: frames are queued without waiting, and when
the disk cannot keep up they are dropped and counted; the events themselves
are still handled.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any, Final, NamedTuple

import msgpack
import msgspec
import trio

from .core.records import (
    ACTION,
    CAPTURE_MAGIC,
    CLOCK,
    EVENTS,
    FILE_CLOCK,
    FRAME,
    JOURNAL_MAGIC,
    POSITIONS,
    PUSHED,
    clock_record,
    event_item,
    finite_number,
    frame,
    pushed_record,
)
from .files import FileProblem, open_regular
from .logs import kv
from .record_log import LogFile, read_log

__all__ = [
    "CAPTURE_FORMAT",
    "CAPTURE_VERSION",
    "CaptureError",
    "CaptureSettings",
    "CaptureWriter",
    "ClockNote",
    "Item",
    "PushNote",
    "Record",
    "frames",
    "item_time",
    "read_capture",
]

log = logging.getLogger("evapi_worker.capture")

CAPTURE_FORMAT: Final = "evapi-worker-capture"
CAPTURE_VERSION: Final = 3
_READABLE: Final = (1, 2)  # the msgpack versions, before the record log
SUFFIX: Final = ".evcap"


class Record(NamedTuple):
    """One captured frame (a tuple: replay reads millions of them)."""

    node: str
    seq: int | None
    received: float  # unix time the worker read the frame
    payload: bytes


class PushNote(NamedTuple):
    """A push the provider accepted: when, for which call and device."""

    sent: float  # unix time of the provider's answer
    call_id: str
    device: str
    provider: str
    aor: str = ""  # the account called ("" in notes written before it was kept)
    # Seconds the provider may keep it for an offline phone (push.expiration;
    # None in notes written before it was kept)
    lasts: float | None = None


class ClockNote(NamedTuple):
    """A node's clock as a ping measured it."""

    at: float  # unix time of the measurement
    node: str
    offset: float  # the node's clock minus the wall clock
    uncertainty: float  # half the ping's round trip


Item = Record | PushNote | ClockNote
"""What a capture (or a journal) holds, in the order it happened."""


def item_time(item: Item) -> float:
    """When an item happened (unix time): files are merged by it."""
    if type(item) is Record:
        return item.received
    return item.sent if type(item) is PushNote else item.at  # type: ignore[union-attr]


def frames(items: Iterable[Item]) -> Iterator[Record]:
    """The frames among ``items`` (the notes left out)."""
    return (item for item in items if type(item) is Record)


_Queued = tuple[str, int | None, float, bytes] | PushNote | ClockNote


class CaptureSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where and how frames are recorded, and the ``[capture]`` table of the
    settings file."""

    folder: Path
    max_bytes: Annotated[int, msgspec.Meta(ge=4096)] = 64 * 1024 * 1024  # a file is closed at this size...
    max_age: Annotated[float, msgspec.Meta(ge=1, le=31_536_000)] = 3600.0  # ...or this age (seconds)
    keep: Annotated[int, msgspec.Meta(ge=1)] = 48  # files kept; older ones are deleted
    queue: Annotated[int, msgspec.Meta(ge=1)] = 100_000  # frames waiting for the disk; more are dropped


class CaptureError(Exception):
    """A file that is not a capture, or a capture of another version."""


class CaptureWriter:
    """Queues frames from the reader; a task writes them in a worker thread."""

    def __init__(
        self, settings: CaptureSettings, on_error: Callable[[int, OSError], None] | None = None, retry: float = 5.0
    ) -> None:
        self.settings = settings
        self.dropped = 0
        self.written = 0
        self.lost = 0  # records a write error cost (disk full, folder gone...)
        self._on_error = on_error
        self._retry = retry
        self._tx, self._rx = trio.open_memory_channel[_Queued](settings.queue)
        self._file: LogFile | None = None
        self._path: Path | None = None
        self._opened = 0.0
        self._size = 0

    def record(self, node: str, seq: int | None, received: float, payload: bytes) -> bool:
        """Queue one frame; False (and counted) when the disk is behind."""
        return self._queue((node, seq, float(received), payload))

    def note_push(self, note: PushNote) -> bool:
        """Queue a push note; False (and counted) when the disk is behind."""
        return self._queue(note)

    def note_clock(self, note: ClockNote) -> bool:
        """Queue a clock note; False (and counted) when the disk is behind."""
        return self._queue(note)

    def _queue(self, item: _Queued) -> bool:
        try:
            self._tx.send_nowait(item)
        except trio.WouldBlock:
            self.dropped += 1
            return False
        return True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.settings.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        task_status.started()
        try:
            while True:
                batch = [await self._rx.receive()]
                while len(batch) < 4096:
                    try:
                        batch.append(self._rx.receive_nowait())
                    except trio.WouldBlock:
                        break
                # File I/O in a thread: a slow disk must not stall the reader.
                if not await self._write_safely(batch):
                    # Disk full or folder gone: the capture pauses (what
                    # arrives meanwhile is dropped and counted), the worker
                    # goes on, and writing is tried again later.
                    await trio.sleep(self._retry)
        finally:
            with trio.CancelScope(shield=True):
                rest = []
                while True:
                    try:
                        rest.append(self._rx.receive_nowait())
                    except trio.WouldBlock:
                        break
                await self._write_safely(rest)
                await trio.to_thread.run_sync(self._close_quietly)

    async def _write_safely(self, batch: list[_Queued]) -> bool:
        try:
            await trio.to_thread.run_sync(self._write, batch)
        except OSError as exc:
            self.lost += len(batch)
            log.error("capture write failed %s", kv(records=len(batch), error=str(exc), retry_in=self._retry))
            await trio.to_thread.run_sync(self._close_quietly)  # a new file next time
            if self._on_error is not None:
                self._on_error(len(batch), exc)
            return False
        return True

    def _close_quietly(self) -> None:
        try:
            self._close()
        except OSError:
            self._file = None

    def _write(self, batch: list[_Queued]) -> None:
        if not batch:
            return
        data = _framed(batch)
        now = time.time()
        if self._file is None or self._size >= self.settings.max_bytes or now - self._opened >= self.settings.max_age:
            self._rotate(now)
        assert self._file is not None
        self._file.append(data)
        self._size += len(data)
        self.written += len(batch)

    def _rotate(self, now: float) -> None:
        self._close()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
        path = self.settings.folder / f"capture-{stamp}-{os.getpid()}-{int(now * 1000) % 1000:03d}{SUFFIX}"
        # 0600: captures hold push tokens and phone numbers.
        self._file = LogFile(path, CAPTURE_MAGIC, frame([FILE_CLOCK, 0.0]), exclusive=True)
        self._path, self._opened, self._size = path, now, self._file.size
        log.info("capture file %s", kv(path=str(path)))
        files = sorted(self.settings.folder.glob(f"capture-*{SUFFIX}"))
        for old in files[: max(0, len(files) - self.settings.keep)]:
            old.unlink(missing_ok=True)

    def _close(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            file.close()


# Frames per record: one damaged record costs at most these.
_FRAMES_PER_RECORD: Final = 256


def _framed(batch: list[_Queued]) -> bytes:
    """The batch as records, in order: runs of frames in records of up to
    :data:`_FRAMES_PER_RECORD`, each note a record of its own."""
    out: list[bytes] = []
    run: list[object] = []
    for item in batch:
        if type(item) is PushNote:
            note: list[object] = [PUSHED, item.sent, item.call_id, item.aor, item.device, item.lasts, item.provider]
        elif type(item) is ClockNote:
            note = [CLOCK, item.at, item.node, item.offset, item.uncertainty]
        else:
            run.append(item)
            if len(run) == _FRAMES_PER_RECORD:
                out.append(frame([FRAME, run]))
                run = []
            continue
        if run:
            out.append(frame([FRAME, run]))
            run = []
        out.append(frame(note))
    if run:
        out.append(frame([FRAME, run]))
    return b"".join(out)


def read_capture(path: Path, problems: list[str] | None = None) -> Iterator[Item]:
    """What one capture file (or journal) holds, in order, read as it is
    needed. A damaged or malformed record is reported in ``problems``
    (when given) and skipped; reading goes on at the next."""
    try:
        magic, records = read_log(path)
    except OSError as exc:
        raise CaptureError(str(exc) if isinstance(exc, FileProblem) else f"{path}: {exc.strerror or exc}") from None
    if magic in (CAPTURE_MAGIC, JOURNAL_MAGIC):
        return _log_items(path, records, problems if problems is not None else [])
    return _read_msgpack(path, problems)


def _log_items(path: Path, records: Iterator[list[object] | None], problems: list[str]) -> Iterator[Item]:
    clock: float | None = None  # the file's clock: wall minus its times
    n = 0
    isfinite = math.isfinite
    for record in records:
        n += 1
        kind = record[0] if record else None
        batch: Any = record[1] if record and len(record) == 2 else None
        if kind == FRAME and clock is not None and type(batch) is list:
            # Nearly every record: its frames checked in one tight loop.
            good = [
                Record(node, seq if type(seq) is int else None, received + clock, payload)
                for node, seq, received, payload in (f for f in batch if type(f) is list and len(f) == 4)
                if type(node) is str and type(received) is float and isfinite(received) and type(payload) is bytes
            ]
            if len(good) != len(batch):
                problems.append(f"{path}: {len(batch) - len(good)} malformed frames in record {n}, skipped")
            yield from good
            continue
        try:
            if record is None:
                problems.append(f"{path}: damaged bytes before record {n}, skipped")
                n -= 1
            elif kind == EVENTS and clock is not None and isinstance(record[1], list):
                for item in record[1]:  # a journal's batch: events the engine took
                    if (event := event_item(item)) is not None:
                        yield Record(event[0], None, event[1] + clock, event[2])
                    else:
                        problems.append(f"{path}: malformed event in record {n}, skipped")
            elif kind == PUSHED and clock is not None and (note := _push_record(record, clock)) is not None:
                yield note
            elif kind == CLOCK and clock is not None and (measured := _clock_record(record, clock)) is not None:
                yield measured
            elif kind == FILE_CLOCK and len(record) == 2 and finite_number(record[1]):
                clock = float(record[1])
            elif kind not in (ACTION, POSITIONS):  # a journal's actions and stream positions: not for a replay
                problems.append(f"{path}: malformed record {n} ({str(kind)[:8]!r}), skipped")
        except (IndexError, TypeError, ValueError):
            problems.append(f"{path}: malformed record {n}, skipped")


def _push_record(record: list[object], clock: float) -> PushNote | None:
    pushed = pushed_record(record)
    if pushed is None:
        return None
    return PushNote(pushed.at + clock, pushed.call_id, pushed.device, pushed.provider, pushed.aor, pushed.lasts)


def _clock_record(record: list[object], clock: float) -> ClockNote | None:
    measured = clock_record(record)
    return (
        None
        if measured is None
        else ClockNote(measured.at + clock, measured.node, measured.offset, measured.uncertainty)
    )


def _read_msgpack(path: Path, problems: list[str] | None) -> Iterator[Item]:
    """A capture of version 1 or 2: a header map, then msgpack records back
    to back (one bad byte ends what can be read)."""
    try:
        fd = open_regular(path)
    except OSError as exc:
        raise CaptureError(str(exc) if isinstance(exc, FileProblem) else f"{path}: {exc.strerror or exc}") from None
    f = os.fdopen(fd, "rb")
    try:
        unpacker = msgpack.Unpacker(f, raw=False, max_buffer_size=64 * 1024 * 1024)
        try:
            header = next(unpacker)
        except (StopIteration, ValueError, msgpack.UnpackException):
            raise CaptureError(f"{path}: not an evapi-worker capture") from None
        if not isinstance(header, dict) or header.get("format") != CAPTURE_FORMAT:
            raise CaptureError(f"{path}: not an evapi-worker capture")
        if header.get("version") not in _READABLE:
            raise CaptureError(f"{path}: capture format version {header.get('version')!r}, expected {CAPTURE_VERSION}")
    except BaseException:
        f.close()
        raise
    return _msgpack_items(path, f, unpacker, problems)


def _msgpack_items(path: Path, f: Any, unpacker: Any, problems: list[str] | None) -> Iterator[Item]:
    with f:
        size = os.fstat(f.fileno()).st_size
        try:
            for item in unpacker:
                if type(item) is dict:
                    note = _push_note(item.get("push"))
                    if note is None and problems is not None:
                        problems.append(f"{path}: malformed push note ending at byte {unpacker.tell()}, skipped")
                    elif note is not None:
                        yield note
                    continue
                if (
                    type(item) is not list
                    or len(item) != 4
                    or type(item[0]) is not str
                    or type(item[2]) is not float
                    or type(item[3]) is not bytes
                ) and not _record_like(item):
                    if problems is not None:
                        problems.append(f"{path}: malformed record ending at byte {unpacker.tell()}, skipped")
                    continue
                seq = item[1]
                yield Record(item[0], seq if type(seq) is int else None, float(item[2]), item[3])
        except (ValueError, msgpack.UnpackException) as exc:
            if problems is not None:
                problems.append(f"{path}: unreadable data at byte {unpacker.tell()} ({exc}); rest skipped")
            return
        if unpacker.tell() < size and problems is not None:
            problems.append(f"{path}: torn last record ({size - unpacker.tell()} bytes) skipped")


def _push_note(value: object) -> PushNote | None:
    if not (isinstance(value, list) and len(value) in (4, 5, 6) and all(isinstance(v, str) for v in value[1:5])):
        return None
    sent = value[0]
    if not finite_number(sent):
        return None
    lasts = value[5] if len(value) == 6 else None
    if lasts is not None and not (finite_number(lasts) and 0 <= lasts <= 3600):
        return None
    call_id, device, provider, *aor = value[1:5]
    return PushNote(
        float(sent), call_id, device, provider, aor[0] if aor else "", None if lasts is None else float(lasts)
    )


def _record_like(item: object) -> bool:
    # The slow check, for what the fast type() test above did not expect
    # (an integer receive time from another writer, say).
    return (
        isinstance(item, list)
        and len(item) == 4
        and isinstance(item[0], str)
        and isinstance(item[2], int | float)
        and not isinstance(item[2], bool)
        and isinstance(item[3], bytes)
    )
