"""Test-wide settings."""

from __future__ import annotations

import socket
import subprocess
import time
from typing import Any, Final

import pytest
import trio
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


# -- tiers --------------------------------------------------------------------
#
# Every test is in one tier, by its folder: ``tests/e2e`` (real Kamailio,
# SIPp, redis-server, linphonec, Chromium), ``tests/process`` (a real worker
# process, fake peers on loopback sockets, a child process) or
# ``tests/unit`` (none of that). The folder is the test's marker. A unit
# test that opens a network socket or starts a process fails at once: the
# fast tier (``./scripts/test.sh --fast``, ``pytest -m unit``) stays fast
# and runs anywhere.

TIERS: Final = ("unit", "process", "e2e")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        folder = item.path.parent.name
        if folder not in TIERS:
            raise pytest.UsageError(f"{item.path}: a test module belongs in tests/unit, tests/process or tests/e2e")
        item.add_marker(getattr(pytest.mark, folder))


def _refused(what: str) -> Any:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a unit test may not {what}: mark its module as a process or e2e test (conftest.py)")

    return refuse


@pytest.fixture(autouse=True)
def _unit_tests_stay_in_memory(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A unit test opens no network socket (socketpairs are fine) and
    starts no process."""
    if request.node.get_closest_marker("unit") is not None:
        real_connect, real_bind = socket.socket.connect, socket.socket.bind

        def connect(self: socket.socket, address: Any) -> None:
            if self.family in (socket.AF_INET, socket.AF_INET6):
                _refused("connect to the network")()
            real_connect(self, address)

        def bind(self: socket.socket, address: Any) -> None:
            if self.family in (socket.AF_INET, socket.AF_INET6):
                _refused("listen on the network")()
            real_bind(self, address)

        monkeypatch.setattr(socket.socket, "connect", connect)
        monkeypatch.setattr(socket.socket, "bind", bind)
        monkeypatch.setattr(subprocess.Popen, "__init__", _refused("start a process"))
        monkeypatch.setattr(trio.lowlevel, "open_process", _refused("start a process"))
