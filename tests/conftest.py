"""Test-wide settings."""

from __future__ import annotations

import time

import pytest
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


@pytest.fixture(autouse=True)
def _events_stamped_from_now(request: pytest.FixtureRequest) -> None:
    """Kamailio stamps each event with its wall clock, and a worker counts
    a fake call's deadline from the REGISTER's stamp: a module whose tests
    talk to a running worker (``STAMPED_FROM_NOW = True``) gets a ``T0``
    of the moment each test starts, as a live node's events would."""
    module = request.module
    if getattr(module, "STAMPED_FROM_NOW", False):
        module.T0 = time.time()
