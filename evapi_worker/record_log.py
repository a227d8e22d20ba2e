"""Record log files on disk: the one writer and the one reader of the
journal and the capture (their encoding: core/records.py).

The writer appends framed records to a file it opened as what it must be
(regular, no link followed, 0600). What happens when the disk is behind
or full is its owner's policy: the journal never drops a record (its
writes wait in a thread), the capture drops and counts what its queue
cannot hold, and rotates its files.

The reader streams a file's records in bounded memory, whatever its size.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from .core.records import MAGICS, FrameReader
from .files import FileProblem, open_regular

__all__ = ["LogFile", "read_log", "write_all"]

_CHUNK: Final = 1 << 20


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class LogFile:
    """A record log open for appending. A new file starts with ``magic``
    (and ``first``: the records every file of the log starts with)."""

    def __init__(self, path: Path, magic: bytes, first: bytes = b"", *, exclusive: bool = False) -> None:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | (os.O_EXCL if exclusive else 0)
        self.path = path
        self.fd = open_regular(path, flags, 0o600, own=True)
        self.size = 0
        try:
            self.size = os.fstat(self.fd).st_size
            if self.size == 0:
                self.append(magic + first)
        except BaseException:
            os.close(self.fd)
            raise

    def append(self, data: bytes) -> None:
        """Append framed records; OSError when the disk refuses."""
        write_all(self.fd, data)
        self.size += len(data)

    def close(self) -> None:
        os.close(self.fd)


def read_log(path: Path, *, own: bool = False, limit: int | None = None) -> tuple[bytes, Iterator[list[object] | None]]:
    """A record log's magic line and its records, read as they are needed
    (``None`` for each damaged stretch). The magic is b"" when the file is
    no record log (the caller may read an older format). ``limit``: a file
    larger is refused (:class:`FileProblem`) before anything is read; what
    is appended while it is read is read too, up to ``limit``."""
    fd = open_regular(path, own=own)
    try:
        size = os.fstat(fd).st_size
        if limit is not None and size > limit:
            raise FileProblem(errno.EFBIG, path, f"holds {size} bytes, more than the {limit} it may")
        head = os.pread(fd, max(len(m) for m in MAGICS), 0)
    except BaseException:
        os.close(fd)
        raise
    magic = next((m for m in MAGICS if head.startswith(m)), b"")
    if not magic:
        os.close(fd)
        return b"", iter(())
    return magic, _records(fd, len(magic), limit)


def _records(fd: int, start: int, limit: int | None) -> Iterator[list[object] | None]:
    reader = FrameReader()
    left = limit if limit is not None else -1
    try:
        os.lseek(fd, start, os.SEEK_SET)
        while left and (chunk := os.read(fd, _CHUNK if left < 0 else min(_CHUNK, left))):
            left -= len(chunk) if left > 0 else 0
            reader.feed(chunk)
            yield from reader.records()
        yield from reader.records(final=True)
    finally:
        os.close(fd)
