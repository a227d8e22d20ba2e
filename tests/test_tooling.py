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
    lock = Path(__file__).parent.parent / "requirements" / "lock.txt"
    pins = dict(line.split("==", 1) for line in lock.read_text().splitlines() if line and not line.startswith("#"))
    assert {"trio", "msgpack", "msgspec", "prometheus_client", "mypy", "ruff"} <= {
        name.replace("-", "_") for name in pins
    }
    moved = {name: (want, version(name)) for name, want in pins.items() if version(name) != want}
    assert moved == {}


def test_each_module_s_all_is_what_others_import_from_it() -> None:
    # __all__ is the package's API: a name another module (or a test, or a
    # benchmark) imports from a module is in that module's __all__.
    root = Path(__file__).parent.parent
    exported: dict[str, set[str]] = {}
    for path in (root / "evapi_worker").glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
                exported[path.stem] = set(ast.literal_eval(node.value))
    assert len(exported) > 30
    outside = []
    for folder in ("evapi_worker", "tests", "bench"):
        for path in (root / folder).glob("*.py"):
            for found in ast.walk(ast.parse(path.read_text())):
                if not isinstance(found, ast.ImportFrom) or found.module is None:
                    continue
                if folder == "evapi_worker" and found.level == 1:
                    module = found.module
                elif found.module.startswith("evapi_worker."):
                    module = found.module.removeprefix("evapi_worker.")
                else:
                    continue
                outside += [f"{path.name}: {module}.{a.name}" for a in found.names if a.name not in exported[module]]
    assert outside == []


def test_every_module_named_in_a_tier_exists() -> None:
    # A renamed test module would silently fall into the unit tier, whose
    # guard then fails it: names in the tier lists must be real modules.
    from .conftest import E2E, PROCESS

    here = {path.stem for path in Path(__file__).parent.glob("test_*.py")}
    assert not (E2E | PROCESS) - here, (E2E | PROCESS) - here
    assert not E2E & PROCESS
