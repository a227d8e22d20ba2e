"""What the worker process needs before it runs: its settings checked
against the machine (binaries, folders, ports) and the garbage collector's
pace set for a worker that holds much long-lived state."""

from __future__ import annotations

import gc
import os
import shutil

from .config import Config, ConfigError
from .files import FileProblem, check_private_folder
from .net import bind_error

__all__ = ["check_runtime", "tune_gc"]


def tune_gc() -> None:
    """Collect the young generation less often.

    The worker keeps up to hundreds of thousands of small, acyclic state
    objects while every event allocates a few short-lived ones; with
    CPython's default thresholds the cyclic collector rescans that state so
    often that it costs a third of the ingest rate (bench/ingest.py).
    Reference counting still frees everything at once; this only spaces out
    the search for cycles.
    """
    gc.set_threshold(50_000, 20, 100)


def check_runtime(config: Config) -> None:
    """Fail early, with the key to fix, when SIPp or its scenario is missing."""
    if shutil.which(config.sipp.binary) is None:
        raise ConfigError(
            "sipp.binary", f"{config.sipp.binary!r} not found; install SIPp (Debian: apt-get install sip-tester)"
        )
    if config.sipp.scenario is not None and not config.sipp.scenario.is_file():
        raise ConfigError("sipp.scenario", f"{str(config.sipp.scenario)!r} is not a file")
    if not config.nodes:
        raise ConfigError("kamailio", "no Kamailio node configured (give --kamailio HOST:PORT)")
    if config.state_file is not None:
        folder = config.state_file.parent
        if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError("state_file", f"{str(folder)!r} is not a folder this worker can write in")
        try:
            check_private_folder(folder, "the state")
        except FileProblem as exc:
            raise ConfigError("state_file", str(exc)) from None
    if config.capture is not None:
        folder = config.capture.folder
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise ConfigError("capture.folder", f"{str(folder)!r} cannot be made: {exc.strerror}") from None
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError("capture.folder", f"{str(folder)!r} is not writable")
        try:
            check_private_folder(folder, "the capture")
        except FileProblem as exc:
            raise ConfigError("capture.folder", str(exc)) from None
    if config.metrics is not None:
        host, port = config.metrics
        if (problem := bind_error(host, port)) is not None:
            raise ConfigError("metrics", f"cannot listen on {host}:{port}: {problem.strerror}")
