"""Child processes that end with the worker, however it ends.

A child is started from the main thread with ``setpriv --pdeathsig``
(util-linux): the kernel signals it when the thread that started it ends.
Trio starts processes from a worker thread, which ends after some seconds
idle (and would take the child with it); the main thread lasts as long as
the process, so a worker killed with SIGKILL leaves no SIPp behind holding
its ports. Each child runs in a session of its own: one ``killpg`` ends it
and whatever it started.

For the moment between the fork and ``setpriv``'s ``prctl``, and for hosts
without setpriv, a child's pid and start time are written to a pid file in
its private folder; a worker that starts finds the files of runs that
died (:func:`end_left_children`) and ends the processes they name, if they
are still the same processes (same start time) and this user's. A process
is never chosen by its name.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import signal
import stat
import subprocess
from pathlib import Path
from typing import IO, Final

import trio

from .logs import kv

__all__ = ["PID_FILE", "ChildProcess", "end_left_child", "start_time"]

log = logging.getLogger("evapi_worker.children")

PID_FILE: Final = "child.pid"
_PID_FILE_MAX: Final = 64


def start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot, /proc/PID/stat); None
    if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            data = file.read(4096)
    except OSError:
        return None
    # The name (field 2) may hold spaces and parentheses: fields follow its last ")".
    fields = data.rpartition(b")")[2].split()
    try:
        return int(fields[19])  # field 22
    except (IndexError, ValueError):
        return None


class ChildProcess:
    """A child process started from this process's main thread."""

    _setpriv: str | bool | None = False  # False: not looked for yet

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self.pid = popen.pid

    @classmethod
    def start(
        cls,
        command: list[str],
        *,
        stdout: IO[bytes] | int = subprocess.DEVNULL,
        stderr: IO[bytes] | int = subprocess.DEVNULL,
        cwd: Path | None = None,
        pid_file: Path | None = None,
        death_signal: str = "KILL",
    ) -> ChildProcess:
        """Start ``command`` (an argument list, never a shell) in a session
        of its own; ``death_signal`` ends it when this process ends. Must be
        called from the thread that runs Trio. Raises OSError."""
        setpriv = cls._find_setpriv()
        if setpriv is not None:
            # Found here, so that a missing program is the OSError it is
            # without setpriv, not setpriv's exit code.
            program = shutil.which(command[0])
            if program is None:
                raise FileNotFoundError(errno.ENOENT, "no such program, or not executable", command[0])
            command = [setpriv, "--pdeathsig", death_signal, "--", program, *command[1:]]
        popen = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, cwd=cwd, start_new_session=True
        )
        child = cls(popen)
        if pid_file is not None:
            child._write_pid_file(pid_file)
        return child

    @classmethod
    def _find_setpriv(cls) -> str | None:
        if cls._setpriv is False:
            cls._setpriv = shutil.which("setpriv")
            if cls._setpriv is None:
                log.warning("setpriv not found: a child outlives a worker killed with SIGKILL until the next start")
        return cls._setpriv if isinstance(cls._setpriv, str) else None

    def _write_pid_file(self, path: Path) -> None:
        started = start_time(self.pid)
        if started is None:
            return  # gone already
        # A new file only (O_EXCL), never through a link.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(f"{self.pid} {started}\n")

    @property
    def returncode(self) -> int | None:
        return self._popen.poll()

    def poll(self) -> int | None:
        return self._popen.poll()

    async def wait(self) -> int:
        """Wait until it has exited (and reap it)."""
        if (code := self._popen.poll()) is not None:
            await trio.lowlevel.checkpoint()
            return code
        fd = os.pidfd_open(self.pid)
        try:
            while (code := self._popen.poll()) is None:
                await trio.lowlevel.wait_readable(fd)
        finally:
            os.close(fd)
        return code

    def kill_group(self, sig: signal.Signals = signal.SIGKILL) -> None:
        """Signal the child's session (it and whatever it started)."""
        if self._popen.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)


def end_left_child(folder: Path) -> int | None:
    """End the child a dead worker's ``folder`` names in its pid file, if it
    still runs as that process and this user's; returns its pid if it was
    ended. The folder must be this user's and no one else's to write."""
    try:
        info = os.lstat(folder)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
            return None
        fd = os.open(folder / PID_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            return None
        text = os.read(fd, _PID_FILE_MAX).decode("ascii", "replace").split()
    finally:
        os.close(fd)
    if len(text) != 2 or not all(part.isdigit() for part in text):
        return None
    pid, started = int(text[0]), int(text[1])
    if pid <= 1 or start_time(pid) != started:
        return None  # gone, or the pid is another process's now
    try:
        if os.stat(f"/proc/{pid}").st_uid != os.geteuid():
            return None
        os.killpg(pid, signal.SIGKILL)  # its session: it and what it started
    except (OSError, ProcessLookupError):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    log.warning("child left by a dead worker ended %s", kv(pid=pid, folder=folder.name))
    return pid
