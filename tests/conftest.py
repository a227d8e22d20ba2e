"""Test-wide settings."""

from __future__ import annotations

import socket
import subprocess
import time
from typing import Any

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
# Every test is in one tier, by its module: ``e2e`` (real Kamailio, SIPp,
# redis-server, linphonec, Chromium: the test_e2e_* modules and the few
# named below), ``process`` (a real worker process, fake peers on loopback
# sockets, a child process) or ``unit`` (none of that: the rest). A unit
# test that opens a network socket or starts a process fails at once: the
# fast tier (``./scripts/test.sh --fast``, ``pytest -m unit``) stays fast
# and runs anywhere.

E2E: frozenset[str] = frozenset({"test_report_browser", "test_bundled", "test_kamailio_config", "test_flood"})
PROCESS: frozenset[str] = frozenset(
    {
        "test_config", "test_crash", "test_deploy", "test_evapi_client", "test_hostile_process",
        "test_http2_client", "test_http_server", "test_net", "test_odd_files", "test_persistence", "test_push",
        "test_push_check", "test_redis_client", "test_service", "test_service_timing", "test_shared_claims",
        "test_shutdown", "test_sipp_runner", "test_stream_source", "test_twin_guard",
    }
)  # fmt: skip


def tier(module: str) -> str:
    name = module.rpartition(".")[2]
    if name.startswith("test_e2e_") or name in E2E:
        return "e2e"
    return "process" if name in PROCESS else "unit"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(getattr(pytest.mark, tier(item.path.stem)))


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
