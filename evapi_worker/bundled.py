"""Files that ship inside the package: the Kamailio drop-ins and config, and
the SIPp scenarios (found here whatever the install: a venv, a wheel, a
source tree)."""

from __future__ import annotations

import filecmp
import shutil
from importlib import resources
from pathlib import Path

__all__ = ["KAMAILIO_FILES", "bundled", "copy_kamailio_files", "kamailio_files"]

# What an operator adds to (or runs as) their Kamailio config, and the
# scenario the worker's SIPp runs (for a scenario of their own).
KAMAILIO_FILES = (
    ("kamailio", "evapi-worker-defs.cfg"),
    ("kamailio", "evapi-worker-routes.cfg"),
    ("kamailio", "kamailio.cfg"),
    ("sipp", "late_call.xml"),
)


def bundled(*parts: str) -> Path:
    """The installed path of a file shipped in the package."""
    return Path(str(resources.files("evapi_worker").joinpath(*parts)))


def kamailio_files() -> list[Path]:
    return [bundled(*parts) for parts in KAMAILIO_FILES]


def copy_kamailio_files(folder: Path, *, force: bool = False) -> list[Path]:
    """Copy :func:`kamailio_files` into ``folder`` (made if missing); a file
    there that differs is kept unless ``force`` (raises FileExistsError
    naming them all, before copying anything)."""
    sources = kamailio_files()
    targets = [folder / source.name for source in sources]
    if not force:
        pairs = zip(sources, targets, strict=True)
        differ = [t for s, t in pairs if t.exists() and not filecmp.cmp(s, t, shallow=False)]
        if differ:
            raise FileExistsError(", ".join(str(t) for t in differ))
    folder.mkdir(parents=True, exist_ok=True)
    for source, target in zip(sources, targets, strict=True):
        shutil.copyfile(source, target)
    return targets
