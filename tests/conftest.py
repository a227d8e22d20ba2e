"""Test-wide settings."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

# Property tests check behaviour, not speed: on a loaded CI machine the
# generation of examples can be slow, and hypothesis's timing checks
# (deadline, too_slow) would then fail tests whose property holds.
settings.register_profile(
    "evapi-worker",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.load_profile("evapi-worker")
