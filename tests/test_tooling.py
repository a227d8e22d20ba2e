"""The test suite's own settings."""

from __future__ import annotations

from hypothesis import HealthCheck, settings


def test_property_tests_do_not_fail_on_a_slow_machine() -> None:
    # A loaded CI machine makes example generation slow; that is not a defect.
    current = settings.default
    assert current is not None
    assert current.deadline is None
    assert HealthCheck.too_slow in current.suppress_health_check
