"""A flood of late registrations: bounded SIPp, overdue calls dropped, the reader keeps reading."""

from __future__ import annotations

from pathlib import Path

import trio

from evapi_worker.config import Config, EvapiSettings
from evapi_worker.core.engine import EngineSettings
from evapi_worker.core.links import NodeAddress
from evapi_worker.service import Service
from evapi_worker.sipp_runner import SippSettings

from ..evapi_server import EvapiServer
from ..sipp_device import fake_sipp

T0 = 1_700_000_000.0
STAMPED_FROM_NOW = True  # T0 is set as each test starts (conftest.py)
FLOOD = 2000


async def test_two_thousand_late_registrations_in_a_second(tmp_path: Path) -> None:
    # Every fake call takes 200 ms and logs its outcome the way the bundled
    # scenario does, so a run that went wrong is not counted as sent and done.
    fake = fake_sipp(tmp_path, "--delay", "0.2")
    server = EvapiServer()
    async with trio.open_nursery() as outer:
        await server.start(outer)
        node = NodeAddress("kam1", "127.0.0.1", server.port, "127.0.0.1", 5099)
        config = Config(
            nodes=(node,),
            engine=EngineSettings(deadline=1.0, settle=0.1, max_devices=500),
            sipp=SippSettings(binary=str(fake), max_concurrent=4),
            evapi=EvapiSettings(reconnect_initial=0.01, reconnect_max=0.05),
        )
        service = Service(config)
        m = service.metrics
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            await server.wait_for(lambda: bool(server.streams))
            await server.send(
                server.event("call_start", T0, call_id="c1", aor="bob@x", from_user="alice")
                + server.event("call_cancelled", T0 + 1, call_id="c1")
            )
            peak = 0

            async def watch_peak() -> None:
                nonlocal peak
                while True:
                    peak = max(peak, service.runner.running)
                    await trio.sleep(0.002)

            nursery.start_soon(watch_peak)
            started = trio.current_time()
            for i in range(FLOOD):
                reg = server.event(
                    "register",
                    T0 + 2 + i / FLOOD,
                    aor="bob@x",
                    contact=f"sip:bob@127.0.0.1:{10000 + i}",
                    src_ip="127.0.0.1",
                    src_port=10000 + i,
                    proto="udp",
                    expires=600,
                    user_agent="LinphoneiOS/5",
                    instance=f"<urn:uuid:{i}>",
                )
                await server.send(reg)
            # The reader kept up: every event was handled while SIPp was busy.
            with trio.fail_after(5):
                while m.value("evapi_worker_events_total", {"node": "kam1", "type": "register"}) < FLOOD:
                    await trio.sleep(0.01)
            assert trio.current_time() - started < 3
            with trio.fail_after(10):
                while (
                    m.value("evapi_worker_fake_calls_total", {"outcome": "overdue"})
                    + m.value("evapi_worker_fake_calls_total", {"outcome": "completed"})
                    < FLOOD
                ):
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        outer.cancel_scope.cancel()
    assert peak <= 4  # never more SIPp than the limit
    sent = m.value("evapi_worker_fake_calls_sent_total")
    overdue = m.value("evapi_worker_fake_calls_total", {"outcome": "overdue"})
    assert 4 <= sent < 100  # about four slots' worth within the 1 s deadline
    assert overdue + sent == FLOOD  # every other one was dropped, counted, never sent late
    assert m.value("evapi_worker_fake_calls_total", {"outcome": "completed"}) == sent
    assert m.value("evapi_worker_fake_calls_total", {"outcome": "failed"}) == 0
    assert service.engine.device_count <= 500  # memory bound held
    assert m.value("evapi_worker_evictions_total", {"table": "devices"}) >= FLOOD - 500
