"""Files that ship inside the package: the Kamailio drop-ins and config, and
the SIPp scenarios (found here whatever the install: a venv, a wheel, a
source tree)."""

from __future__ import annotations

import filecmp
import shutil
from importlib import resources
from pathlib import Path

__all__ = ["KAMAILIO_FILES", "bundled", "copy_kamailio_files", "kamailio_files"]

# What an operator adds to their Kamailio config (the drop-ins, and the edits
# that add them to Debian's stock one), the complete config to run instead,
# and the scenario the worker's SIPp runs (for a scenario of their own); each
# with the name a copy takes: never "kamailio.cfg", which would be theirs.
KAMAILIO_FILES = (
    (("kamailio", "evapi-worker-defs.cfg"), "evapi-worker-defs.cfg"),
    (("kamailio", "evapi-worker-routes.cfg"), "evapi-worker-routes.cfg"),
    (("kamailio", "examples", "debian-stock.patch"), "debian-stock.patch"),
    (("kamailio", "kamailio.cfg"), "evapi-worker-kamailio.cfg"),
    (("sipp", "late_call.xml"), "late_call.xml"),
)


def bundled(*parts: str) -> Path:
    """The installed path of a file shipped in the package."""
    return Path(str(resources.files("evapi_worker").joinpath(*parts)))


def kamailio_files() -> list[Path]:
    return [bundled(*parts) for parts, _ in KAMAILIO_FILES]


def copy_kamailio_files(folder: Path, *, force: bool = False) -> list[Path]:
    """Copy :func:`kamailio_files` into ``folder`` (made if missing); a file
    there that differs is kept unless ``force`` (raises FileExistsError
    naming them all, before copying anything)."""
    sources = kamailio_files()
    targets = [folder / name for _, name in KAMAILIO_FILES]
    if not force:
        pairs = zip(sources, targets, strict=True)
        differ = [t for s, t in pairs if t.exists() and not filecmp.cmp(s, t, shallow=False)]
        if differ:
            raise FileExistsError(", ".join(str(t) for t in differ))
    folder.mkdir(parents=True, exist_ok=True)
    for source, target in zip(sources, targets, strict=True):
        shutil.copyfile(source, target)
    return targets
