"""The test suite's own settings."""

from __future__ import annotations

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
