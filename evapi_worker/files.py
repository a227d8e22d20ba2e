"""Files opened as what they must be.

Every file the worker reads or writes (the state, its journals, captures,
key files, the settings) is a regular file reached without following a
symbolic link at its last step, and read with a bound on its size. A FIFO
there would hang the start, a device (``/dev/zero``) fill the memory, and a
link planted in a folder others can write would make the worker write
through it into a file of someone else's: each is one clear error instead
(:class:`FileProblem`). The worker's own files must also be its user's,
in a folder no other user can write (:func:`check_private_folder`).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Final

__all__ = ["FileProblem", "check_private_folder", "open_regular", "read_regular"]

_KINDS: Final = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFDIR: "a folder",
    stat.S_IFSOCK: "a socket",
    stat.S_IFLNK: "a symbolic link",
}


class FileProblem(OSError):
    """A file that is not what it must be: ``str()`` names it and says what
    is wrong, ``problem`` says it without the name."""

    def __init__(self, code: int, path: Path, problem: str) -> None:
        super().__init__(code, f"{path} {problem}")
        self.path = path
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.path} {self.problem}"


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def open_regular(path: Path, flags: int = os.O_RDONLY, mode: int = 0o600, *, own: bool = False) -> int:
    """``os.open`` for a regular file only, its last step not a symbolic
    link, and never blocking on a FIFO; ``own``: the file must be this
    user's. Raises :class:`FileProblem` (or the OSError of the open)."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise FileProblem(errno.ELOOP, path, "is a symbolic link (name the file itself)") from None
        if exc.errno == errno.ENXIO:  # a FIFO opened for writing with no reader
            raise FileProblem(errno.ENXIO, path, "is a FIFO, not a regular file") from None
        if exc.errno == errno.EISDIR:
            raise FileProblem(errno.EISDIR, path, "is a folder, not a regular file") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FileProblem(errno.EINVAL, path, f"is {_kind(info.st_mode)}, not a regular file")
        if own and info.st_uid != os.geteuid():
            raise FileProblem(errno.EPERM, path, f"belongs to user {info.st_uid}, not to this one")
        # Blocking again: O_NONBLOCK only kept the open from waiting.
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: Path, limit: int, *, own: bool = False) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (see
    :func:`open_regular`); :class:`FileProblem` when it is larger."""
    fd = open_regular(path, own=own)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise FileProblem(errno.EFBIG, path, f"holds {size} bytes, more than the {limit} it may")
        chunks = []
        left = limit + 1
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise FileProblem(errno.EFBIG, path, f"holds more than the {limit} bytes it may")
    return data


def check_private_folder(folder: Path, what: str) -> None:
    """``folder`` must be a folder of this user's that no other user may
    write to: there, no one else can plant a link or a file where the
    worker writes. :class:`FileProblem` says what is wrong."""
    try:
        info = os.stat(folder)
    except FileNotFoundError:
        raise FileProblem(errno.ENOENT, folder, f"({what} folder) does not exist") from None
    if not stat.S_ISDIR(info.st_mode):
        raise FileProblem(errno.ENOTDIR, folder, f"({what} folder) is {_kind(info.st_mode)}")
    if info.st_uid != os.geteuid():
        raise FileProblem(errno.EPERM, folder, f"({what} folder) belongs to user {info.st_uid}, not to this one")
    if info.st_mode & 0o022:
        raise FileProblem(
            errno.EPERM,
            folder,
            f"({what} folder) can be written by other users (mode {stat.S_IMODE(info.st_mode):o}): "
            "chmod go-w it, or use a folder of the worker's own",
        )
