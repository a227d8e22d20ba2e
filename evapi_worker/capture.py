"""Capture files: every frame Kamailio sent, as msgpack records.

A capture file starts with a header map and continues with one record per
frame received, and one note per push the worker had accepted::

    {"format": "evapi-worker-capture", "version": 2, "created": <unix time>}
    [node, seq or None, received (unix time), payload bytes]
    {"push": [sent (unix time), call_id, device, provider, account, seconds kept]}
    ...

The push notes let a replay measure how long each phone took to wake after
its push, not only after the call started, and judge a pushed device's
REGISTER as the live worker did (its deadline counts from the push). Notes
without the account or the seconds kept, and version 1 files (frames only),
are read too.

Records are appended and flushed in batches, so a file can be read while it
is written, and after a crash; a torn last record is reported and skipped.
The writer rotates files by size and age and keeps a bounded number of them.

Capture never slows the reader: frames are queued without waiting, and when
the disk cannot keep up they are dropped and counted; the events themselves
are still handled.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Final, NamedTuple

import msgpack
import msgspec
import trio

from .files import FileProblem, finite_number, open_regular
from .logs import kv

__all__ = [
    "CAPTURE_FORMAT",
    "CAPTURE_VERSION",
    "CaptureError",
    "CaptureSettings",
    "CaptureWriter",
    "PushNote",
    "Record",
    "read_capture",
]

log = logging.getLogger("evapi_worker.capture")

CAPTURE_FORMAT: Final = "evapi-worker-capture"
CAPTURE_VERSION: Final = 2
_READABLE: Final = (1, 2)
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


_Item = tuple[str, int | None, float, bytes] | PushNote


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
        self._tx, self._rx = trio.open_memory_channel[_Item](settings.queue)
        self._file: Any = None
        self._path: Path | None = None
        self._opened = 0.0
        self._size = 0

    def record(self, node: str, seq: int | None, received: float, payload: bytes) -> bool:
        """Queue one frame; False (and counted) when the disk is behind."""
        return self._queue((node, seq, received, payload))

    def note_push(self, note: PushNote) -> bool:
        """Queue a push note; False (and counted) when the disk is behind."""
        return self._queue(note)

    def _queue(self, item: _Item) -> bool:
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

    async def _write_safely(self, batch: list[_Item]) -> bool:
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

    def _write(self, batch: list[_Item]) -> None:
        if not batch:
            return
        data = b"".join(
            msgpack.packb({"push": list(item)} if type(item) is PushNote else list(item), use_bin_type=True)
            for item in batch
        )
        now = time.time()
        if self._file is None or self._size >= self.settings.max_bytes or now - self._opened >= self.settings.max_age:
            self._rotate(now)
        self._file.write(data)
        self._file.flush()
        self._size += len(data)
        self.written += len(batch)

    def _rotate(self, now: float) -> None:
        self._close()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
        path = self.settings.folder / f"capture-{stamp}-{os.getpid()}-{int(now * 1000) % 1000:03d}{SUFFIX}"
        # 0600: captures hold push tokens and phone numbers.
        self._file = os.fdopen(open_regular(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600), "ab")
        header = {"format": CAPTURE_FORMAT, "version": CAPTURE_VERSION, "created": now}
        data = msgpack.packb(header, use_bin_type=True)
        self._file.write(data)
        self._path, self._opened, self._size = path, now, len(data)
        log.info("capture file %s", kv(path=str(path)))
        files = sorted(self.settings.folder.glob(f"capture-*{SUFFIX}"))
        for old in files[: max(0, len(files) - self.settings.keep)]:
            old.unlink(missing_ok=True)

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_capture(
    path: Path, problems: list[str] | None = None, pushes: list[PushNote] | None = None
) -> Iterator[Record]:
    """Records of one capture file, in order. A malformed record is reported
    in ``problems`` (when given) and skipped; a torn last record too. Push
    notes are added to ``pushes`` (when given) as they are read."""
    try:
        fd = open_regular(path)
    except OSError as exc:
        raise CaptureError(str(exc) if isinstance(exc, FileProblem) else f"{path}: {exc.strerror or exc}") from None
    size = os.fstat(fd).st_size
    with os.fdopen(fd, "rb") as f:
        unpacker = msgpack.Unpacker(f, raw=False, max_buffer_size=64 * 1024 * 1024)
        try:
            header = next(unpacker)
        except (StopIteration, ValueError, msgpack.UnpackException):
            raise CaptureError(f"{path}: not an evapi-worker capture") from None
        if not isinstance(header, dict) or header.get("format") != CAPTURE_FORMAT:
            raise CaptureError(f"{path}: not an evapi-worker capture")
        if header.get("version") not in _READABLE:
            raise CaptureError(f"{path}: capture format version {header.get('version')!r}, expected {CAPTURE_VERSION}")
        try:
            for item in unpacker:
                if type(item) is dict:
                    note = _push_note(item.get("push"))
                    if note is None and problems is not None:
                        problems.append(f"{path}: malformed push note ending at byte {unpacker.tell()}, skipped")
                    elif note is not None and pushes is not None:
                        pushes.append(note)
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
