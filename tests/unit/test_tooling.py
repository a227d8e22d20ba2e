"""The test suite's own settings, the locked versions, and the package's API."""

from __future__ import annotations

import ast
from importlib.metadata import version
from pathlib import Path

from hypothesis import HealthCheck, settings


def test_property_tests_do_not_fail_on_a_slow_machine() -> None:
    # A loaded CI machine makes example generation slow; that is not a defect.
    current = settings.default
    assert current is not None
    assert current.deadline is None
    assert HealthCheck.too_slow in current.suppress_health_check


def test_the_installed_versions_are_the_locked_ones() -> None:
    # CI installs with requirements/lock.txt as constraints; a version that
    # moved means the lock is not what CI checked.
    lock = Path(__file__).parent.parent.parent / "requirements" / "lock.txt"
    pins = dict(line.split("==", 1) for line in lock.read_text().splitlines() if line and not line.startswith("#"))
    assert {"trio", "msgpack", "msgspec", "prometheus_client", "mypy", "ruff"} <= {
        name.replace("-", "_") for name in pins
    }
    moved = {name: (want, version(name)) for name, want in pins.items() if version(name) != want}
    assert moved == {}


def test_each_module_s_all_is_what_others_import_from_it() -> None:
    # __all__ is the package's API: a name another module (or a test, or a
    # benchmark) imports from a module is in that module's __all__.
    root = Path(__file__).parent.parent.parent
    exported: dict[str, set[str]] = {}
    package = root / "evapi_worker"
    for path in package.rglob("*.py"):
        name = ".".join(path.relative_to(package).with_suffix("").parts)
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
                exported[name] = set(ast.literal_eval(node.value))
    assert len(exported) > 30
    outside = []
    for folder in ("evapi_worker", "tests", "bench"):
        for path in (root / folder).rglob("*.py"):
            for found in ast.walk(ast.parse(path.read_text())):
                if not isinstance(found, ast.ImportFrom) or found.module is None:
                    continue
                if folder == "evapi_worker" and found.level:
                    # Relative: resolved from the importing module's package.
                    here = path.relative_to(package).parent.parts
                    base = here[: len(here) - (found.level - 1)]
                    module = ".".join((*base, found.module))
                elif found.module.startswith("evapi_worker."):
                    module = found.module.removeprefix("evapi_worker.")
                else:
                    continue
                for a in found.names:
                    if f"{module}.{a.name}" in exported:
                        continue  # a module of a subpackage (from .core import sip_values)
                    if a.name not in exported[module]:
                        outside.append(f"{path.name}: {module}.{a.name}")
    assert outside == []


def test_every_test_module_is_in_a_tier_folder() -> None:
    # The folder is the tier (conftest.py): a module left beside them
    # would belong to none.
    tests = Path(__file__).parent.parent
    assert sorted(p.name for p in tests.glob("test_*.py")) == []
    tiers = {
        folder: sorted(p.stem for p in (tests / folder).glob("test_*.py")) for folder in ("unit", "process", "e2e")
    }
    assert all(tiers.values()), tiers
    assert not [name for name in tiers["unit"] + tiers["process"] if name.startswith("test_e2e_")]


# What a core module may not import: an event loop, files, sockets,
# processes, clocks, logging (the adapters count and log what the core says).
_IO_MODULES = frozenset(
    {
        *("trio", "anyio", "asyncio", "os", "io", "pathlib", "shutil", "tempfile", "socket", "ssl", "select"),
        *("selectors", "subprocess", "signal", "threading", "ctypes", "time", "logging", "sys", "http"),
        *("urllib.request", "prometheus_client", "h2"),
    }
)


def test_the_core_imports_no_trio_and_does_no_io() -> None:
    core = Path(__file__).parent.parent.parent / "evapi_worker" / "core"
    found: list[str] = []
    for path in sorted(core.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    # Relative imports stay inside the core.
                    if node.level > 1:
                        found.append(f"{path.name}: from {'.' * node.level}{node.module or ''}")
                    continue
                names = [node.module or ""]
            else:
                continue
            found += [f"{path.name}: {n}" for n in names if n in _IO_MODULES or n.split(".")[0] in _IO_MODULES]
            found += [f"{path.name}: {n}" for n in names if n.startswith("evapi_worker")]
    assert len(list(core.glob("*.py"))) > 15
    assert found == []
