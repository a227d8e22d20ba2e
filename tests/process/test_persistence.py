"""State on disk while running: snapshots, journals, actions saved at stop."""

from __future__ import annotations

import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest
import trio
import trio.testing

from evapi_worker import persistence
from evapi_worker.config import Config
from evapi_worker.core.engine import Act, Decision, Engine, EngineSettings, Reason
from evapi_worker.core.events import parse_event
from evapi_worker.core.links import NodeAddress
from evapi_worker.core.outcomes import Outcome
from evapi_worker.core.state import decode_snapshot
from evapi_worker.persistence import Restored, StateStore
from evapi_worker.service import Service
from evapi_worker.sipp_runner import SippSettings

from ..evapi_server import EvapiServer
from ..helpers import Wire, frame
from ..sipp_device import fake_sipp

T0 = 1_700_000_000.0
STAMPED_FROM_NOW = True  # T0 is set as each test starts (conftest.py)


class Errors(list[tuple[str, OSError]]):
    def __call__(self, file: str, exc: OSError) -> None:
        self.append((file, exc))


def ended_call(engine: Engine, wire: Wire) -> None:
    engine.handle(wire.start(T0), 0.0)
    engine.handle(wire.cancelled(T0 + 1), 1.0)


def feed(engine: Engine) -> Callable[[str, bytes, float], list[Decision]]:
    def replay(node: str, payload: bytes, now: float) -> list[Decision]:
        return engine.handle(parse_event(payload).event, now)

    return replay


def test_export_and_import_give_back_the_same_state() -> None:
    wire, engine = Wire(), Engine()
    ended_call(engine, wire)
    engine.handle(wire.branch_reply(T0 + 0.5, "sip:desk@10.0.0.1"), 0.5)
    (act,) = engine.handle(wire.register(T0 + 2), 2.0)
    assert isinstance(act, Act)
    copy = Engine()
    copy.import_state(engine.export_state())
    assert copy.export_state() == engine.export_state()
    assert (copy.call_count, copy.device_count) == (1, 1)


class Journaled:
    """An engine whose every event is journaled, like the service's."""

    def __init__(self, path: Path, wall_offset: float = 1000.0) -> None:
        self.wire, self.engine = Wire(), Engine()
        self.errors = Errors()
        self.store = StateStore(path, wall_offset, self.errors)
        self.store.restore(self.engine, 0.0, feed(self.engine))

    def handle(self, raw: bytes, now: float) -> list[Decision]:
        decisions = self.engine.handle(parse_event(raw).event, now)
        self.store.note_event("kam1", now, raw)
        return decisions


def restored(path: Path, now: float, wall_offset: float = 1000.0) -> tuple[Engine, Restored]:
    engine = Engine()
    return engine, StateStore(path, wall_offset, Errors()).restore(engine, now, feed(engine))


def test_journaled_events_after_the_snapshot_are_restored(tmp_path: Path) -> None:
    j = Journaled(tmp_path / "state")
    j.handle(j.wire.raw("call_start", T0, call_id="c1", aor="bob@example.com", from_user="alice"), 0.0)
    j.store.write(j.store.snapshot(j.engine, 0.5))
    j.handle(j.wire.raw("call_start", T0 + 1, call_id="c2", aor="bob@example.com", from_user="alice"), 1.0)
    j.store.flush()  # then kill -9
    engine, result = restored(tmp_path / "state", 0.0, wall_offset=1002.0)  # restarted 2 s later
    assert (result.calls, result.events) == (1, 1)
    assert sorted(c.call_id for c in engine.export_state().calls) == ["c1", "c2"]
    # Re-based through the wall clock: c2 rings until 1 + 180 s on the old clock.
    (c2,) = [c for c in engine.export_state().calls if c.call_id == "c2"]
    assert c2.expires_at == 1.0 + 180.0 - 2.0


def test_the_journal_keeps_an_action_begun_after_the_last_snapshot(tmp_path: Path) -> None:
    j = Journaled(tmp_path / "state")
    j.handle(j.wire.raw("call_start", T0, call_id="c1", aor="bob@example.com", from_user="alice"), 0.0)
    j.handle(j.wire.raw("call_cancelled", T0 + 1, call_id="c1"), 1.0)
    j.store.write(j.store.snapshot(j.engine, 1.5))
    (act,) = j.engine.handle(j.wire.register(T0 + 2), 2.0)  # not journaled as an event...
    j.store.note_action(act.call_id, act.aor, act.device)  # ...but its action is...
    j.store.flush()  # ...before its pin goes out; then kill -9

    def again(journal: bool) -> list[Decision]:
        if not journal:
            for path in tmp_path.glob("state.journal.*"):
                path.unlink()
        engine, _ = restored(tmp_path / "state", 10.0)
        return engine.handle(j.wire.register(T0 + 3), 10.5)

    assert [(d.action.value, d.reason) for d in again(journal=True)] == [("none", Reason.DUPLICATE)]
    assert [d.action.value for d in again(journal=False)] == ["fake_call"]  # what the journal prevents
    assert j.errors == []


def test_a_settle_decision_restored_from_the_journal_is_not_made_twice() -> None:
    wire, engine = Wire(), Engine(EngineSettings(settle=0.5))
    engine.handle(wire.start(T0), 0.0)
    assert engine.handle(wire.register(T0 + 1), 1.0) == []  # ringing: waits for the settle delay
    engine.mark_decided("call-1", "urn:uuid:iphone-1")  # the journal says it was acted upon
    assert engine.tick(2.0) == []


def test_a_torn_last_journal_record_is_ignored(tmp_path: Path) -> None:
    j = Journaled(tmp_path / "state")
    j.handle(j.wire.raw("call_start", T0, call_id="c1", aor="bob@example.com", from_user="alice"), 0.0)
    j.store.note_action("c1", "bob@example.com", "urn:uuid:iphone-1")
    j.store.close()
    (journal,) = tmp_path.glob("state.journal.*")
    with journal.open("ab") as f:
        f.write(b"\x92\xa1e\x91")  # a batch cut short by a crash
    _, result = restored(tmp_path / "state", 5.0)
    assert (result.events, result.actions_begun) == (1, 1)


def test_a_well_framed_record_nested_past_any_depth_is_skipped_not_an_end(tmp_path: Path) -> None:
    j = Journaled(tmp_path / "state")
    j.handle(j.wire.raw("call_start", T0, call_id="c1", aor="bob@example.com", from_user="alice"), 0.0)
    j.store.close()
    (journal,) = tmp_path.glob("state.journal.*")
    payload = b"\x91" * 100_000 + b"\xc0"  # a list in a list... 100,000 deep: the CRC is right
    with journal.open("ab") as f:
        f.write(struct.pack(">4sII", b"\xe5EVJ", len(payload), zlib.crc32(payload)) + payload)
    j2 = Journaled(tmp_path / "state")  # restores, then journals on
    j2.handle(j2.wire.raw("call_start", T0 + 1, call_id="c2", aor="bob@example.com", from_user="alice"), 1.0)
    j2.store.close()
    engine, result = restored(tmp_path / "state", 5.0)
    assert (result.events, result.skipped) == (2, 1)
    assert engine.call_count == 2


def test_a_written_snapshot_removes_the_journals_it_contains(tmp_path: Path) -> None:
    j = Journaled(tmp_path / "state")
    j.handle(j.wire.raw("call_start", T0, call_id="c1", aor="bob@example.com", from_user="alice"), 0.0)
    j.store.note_action("c1", "bob@example.com", "a")
    snapshot = j.store.snapshot(j.engine, 1.5)
    j.store.note_action("c1", "bob@example.com", "b")  # after the snapshot: in the next journal
    j.store.flush()
    assert len(list(tmp_path.glob("state.journal.*"))) == 2
    assert j.store.write(snapshot)
    (left,) = tmp_path.glob("state.journal.*")
    assert left.name == f"state.journal.{snapshot.journal}"
    assert decode_snapshot((tmp_path / "state").read_bytes(), "state")[0].journal == snapshot.journal


def test_a_failed_snapshot_is_reported_and_keeps_the_previous_file(tmp_path: Path) -> None:
    j = Journaled(tmp_path / "state")
    assert j.store.write(j.store.snapshot(j.engine, 0.0))
    before = (tmp_path / "state").read_bytes()
    ended_call(j.engine, j.wire)
    (tmp_path / "state.tmp").mkdir()  # the temporary file cannot be made
    assert not j.store.write(j.store.snapshot(j.engine, 1.5))
    assert [file for file, _ in j.errors] == ["snapshot"]
    assert (tmp_path / "state").read_bytes() == before


async def test_a_running_worker_keeps_its_state_on_disk_within_the_interval(tmp_path: Path) -> None:
    state = tmp_path / "state"
    service = Service(Config(state_file=state, state_interval=0.2))
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        now = trio.current_time()
        service.on_frame("kam1", frame("call_start", T0, 1, call_id="c1", aor="bob@x", from_user="a"), now)
        service.on_frame("kam1", frame("call_cancelled", T0 + 1, 2, call_id="c1"), now)
        await trio.sleep(0.5)
        # What a worker killed now would find.
        engine, result = restored(state, trio.current_time(), time.time() - trio.current_time())
        nursery.cancel_scope.cancel()
    assert [c.call_id for c in engine.export_state().calls] == ["c1"]
    assert result.events == 2


REG = {
    "contact": "sip:bob@127.0.0.1:5099", "src_ip": "127.0.0.1", "proto": "udp", "expires": 600,
    "user_agent": "LinphoneiOS/5",
}  # fmt: skip


def stopping_worker(node: NodeAddress, state: Path, sipp: Path, grace: float) -> Config:
    """A worker with one SIPp slot, its state in ``state``."""
    return Config(
        nodes=(node,), engine=EngineSettings(deadline=30), state_file=state, shutdown_grace=grace,
        sipp=SippSettings(binary=str(sipp), max_concurrent=1),
    )  # fmt: skip


def answered_call(server: EvapiServer) -> bytes:
    """bob's call c1, answered elsewhere."""
    start = server.event("call_start", T0, call_id="c1", aor="bob@x", from_user="alice")
    return start + server.event("call_answered", T0 + 1, call_id="c1")


def late_iphones(server: EvapiServer, devices: range) -> bytes:
    """REGISTERs of bob's iPhones ``<i0>``, ``<i1>``… after c1 ended."""
    return b"".join(
        server.event("register", T0 + 2, aor="bob@x", src_port=6000 + i, instance=f"<i{i}>", **REG) for i in devices
    )


def outcomes_of(service: Service, outcomes: list[tuple[str, Outcome]]) -> None:
    """Record how each of ``service``'s actions ends, by device."""
    service.actions.outcome_listeners.append(lambda act, outcome: outcomes.append((act.device, outcome)))


async def run_until(service: Service, count: int, outcomes: list[tuple[str, Outcome]]) -> None:
    """Run ``service`` until ``count`` of its actions ended, into ``outcomes``."""
    outcomes_of(service, outcomes)
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        with trio.fail_after(10):
            while len(outcomes) < count:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()


async def test_actions_waiting_at_stop_are_saved_and_begin_after_the_restart(tmp_path: Path) -> None:
    state = tmp_path / "state"
    slow, quick = tmp_path / "slow", tmp_path / "quick"
    slow.mkdir()
    quick.mkdir()
    server = EvapiServer()
    outcomes: list[tuple[str, Outcome]] = []
    async with trio.open_nursery() as outer:
        await server.start(outer)
        node = NodeAddress("kam1", "127.0.0.1", server.port, "127.0.0.1", 5099)
        first = Service(stopping_worker(node, state, fake_sipp(slow, "--silent"), grace=0.3))
        outcomes_of(first, outcomes)
        async with trio.open_nursery() as nursery:
            await nursery.start(first.run)
            await server.wait_for(lambda: bool(server.streams))
            await server.send(answered_call(server) + late_iphones(server, range(3)))
            # One pinned and in SIPp (its pin acknowledged), two waiting.
            with trio.fail_after(5):
                while (
                    first.runner.running + first.runner.waiting < 3
                    or first.metrics.value("evapi_worker_commands_acked_total", {"node": "kam1", "command": "pin"}) < 1
                ):
                    await trio.sleep(0.01)
            await first.stop()
            nursery.cancel_scope.cancel()
        m = first.metrics
        assert m.value("evapi_worker_fake_calls_total", {"outcome": "killed"}) == 1  # SIPp was running
        assert m.value("evapi_worker_fake_calls_total", {"outcome": "deferred"}) == 2
        assert len(decode_snapshot(state.read_bytes(), str(state))[0].actions) == 2
        deferred = sorted(device for device, outcome in outcomes if outcome is Outcome.DEFERRED)

        outcomes.clear()
        await run_until(Service(stopping_worker(node, state, fake_sipp(quick), grace=0.3)), 2, outcomes)
        outer.cancel_scope.cancel()
    assert len(deferred) == 2
    assert sorted(outcomes) == [(device, Outcome.COMPLETED) for device in deferred]  # the killed one is not sent again


async def test_a_stop_in_a_burst_finishes_the_begun_fake_call_and_saves_the_rest(tmp_path: Path) -> None:
    """The pin in flight is acknowledged over the connection kept through the
    grace; the actions waiting for SIPp and those decided during the grace are
    saved, not failed, and the restart begins each of them once."""
    state = tmp_path / "state"
    slow, quick = tmp_path / "slow", tmp_path / "quick"
    slow.mkdir()
    quick.mkdir()
    server = EvapiServer(auto_ack=False)
    outcomes: list[tuple[str, Outcome]] = []
    async with trio.open_nursery() as outer:
        await server.start(outer)
        node = NodeAddress("kam1", "127.0.0.1", server.port, "127.0.0.1", 5099)
        first = Service(stopping_worker(node, state, fake_sipp(slow, "--delay", "0.3"), grace=5))
        outcomes_of(first, outcomes)
        async with trio.open_nursery() as nursery:
            await nursery.start(first.run)
            await server.wait_for(lambda: bool(server.streams))
            await server.send(answered_call(server) + late_iphones(server, range(3)))
            await server.wait_for(lambda: [c["cmd"] for c in server.actions] == ["pin"])  # one pin, not acked
            stopped = trio.Event()

            async def stop() -> None:
                await first.stop()
                stopped.set()

            nursery.start_soon(stop)
            await trio.testing.wait_all_tasks_blocked()
            assert not stopped.is_set()
            await server.send(late_iphones(server, range(3, 4)))  # a late iPhone during the grace
            await server.ack(server.actions[0]["id"])
            with trio.fail_after(5):
                await stopped.wait()
            nursery.cancel_scope.cancel()
        m = first.metrics
        assert m.value("evapi_worker_fake_calls_total", {"outcome": "completed"}) == 1
        assert m.value("evapi_worker_fake_calls_total", {"outcome": "deferred"}) == 3
        assert m.value("evapi_worker_fake_calls_total", {"outcome": "failed"}) == 0
        assert [c["cmd"] for c in server.actions] == ["pin"]  # nothing of the deferred reached the node
        [done] = [device for device, outcome in outcomes if outcome is Outcome.COMPLETED]
        deferred = sorted(device for device, outcome in outcomes if outcome is Outcome.DEFERRED)
        assert deferred == sorted({"i0", "i1", "i2", "i3"} - {done})
        assert sorted(a.device for a in decode_snapshot(state.read_bytes(), str(state))[0].actions) == deferred

        outcomes.clear()
        server.auto_ack = True
        await run_until(Service(stopping_worker(node, state, fake_sipp(quick), grace=5)), 3, outcomes)
        outer.cancel_scope.cancel()
    assert sorted(outcomes) == [(device, Outcome.COMPLETED) for device in deferred]


REGISTER = {
    "aor": "bob@example.com", "contact": "sip:bob@192.0.2.10:50000", "src_ip": "127.0.0.1", "src_port": 50000,
    "proto": "udp", "expires": 600, "user_agent": "LinphoneiOS/5.2", "instance": "<urn:uuid:iphone-1>",
}  # fmt: skip


def test_an_action_record_from_before_calls_had_their_account_still_marks_the_call(tmp_path: Path) -> None:
    # Journals written before calls were named by their account hold
    # ["a", call_id, device]: the restored worker begins that action no
    # second time (it retries it, as one begun).
    j = Journaled(tmp_path / "state")
    j.handle(j.wire.raw("call_start", T0, call_id="c1", aor="bob@example.com", from_user="alice"), 0.0)
    j.handle(j.wire.raw("call_cancelled", T0 + 1, call_id="c1"), 1.0)
    j.handle(j.wire.raw("register", T0 + 2, **REGISTER), 2.0)
    j.store.close()
    (journal,) = tmp_path.glob("state.journal.*")
    payload = msgpack.packb(["a", "c1", "urn:uuid:iphone-1"])
    with journal.open("ab") as f:
        f.write(struct.pack(">4sII", b"\xe5EVJ", len(payload), zlib.crc32(payload)) + payload)
    _, result = restored(tmp_path / "state", 5.0)
    assert result.deferred == [] and [a.call_id for a in result.in_doubt] == ["c1"]


def test_journals_stay_within_their_bound_while_snapshots_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The bound and the compaction threshold scaled down (32 MiB and 1 MiB).
    monkeypatch.setattr(persistence, "MAX_JOURNALS", 64 * 1024)
    monkeypatch.setattr(persistence, "_MIN_COMPACT", 8 * 1024)
    dropped: list[int] = []
    j = Journaled(tmp_path / "state")
    j.store = StateStore(tmp_path / "state", 1000.0, j.errors, lambda _path, size: dropped.append(size))
    (tmp_path / "state.tmp").mkdir()  # every snapshot fails
    for n in range(3000):
        j.handle(j.wire.raw("call_start", T0 + n / 1000, call_id=f"c{n}", aor=f"u{n}@example.com", from_user="a"), 0.0)
        j.store.flush()
        if j.store.wants_snapshot:
            assert not j.store.write(j.store.snapshot(j.engine, 0.0))
    sizes = [path.stat().st_size for path in tmp_path.glob("state.journal.*")]
    assert sum(sizes) <= 64 * 1024 + 16 * 1024 and dropped and len(sizes) < 20
    # A restart reads what is left: the newest calls, the oldest dropped (counted).
    engine, result = restored(tmp_path / "state", 0.0)
    assert 0 < engine.call_count < 3000 and result.events == engine.call_count
    kept = {call.call_id for call in engine.export_state().calls}
    assert "c2999" in kept and "c0" not in kept


@pytest.mark.parametrize("pushed", [True, False])
def test_a_push_accepted_before_a_crash_still_counts_from_the_push(tmp_path: Path, pushed: bool) -> None:
    # Journaled with the events: after a restart, a REGISTER answering the
    # push is judged from the push, as the live worker would have.
    j = Journaled(tmp_path / "state")
    j.handle(j.wire.raw("call_start", T0, call_id="c1", aor="bob@example.com", from_user="alice"), 0.0)
    j.store.write(j.store.snapshot(j.engine, 0.02))
    if pushed:
        j.engine.pushed("c1", "bob@example.com", "urn:uuid:iphone-1", 30.0, 0.05)
        j.store.note_push("c1", "bob@example.com", "urn:uuid:iphone-1", 30.0, 0.05)
    j.handle(j.wire.raw("call_cancelled", T0 + 1, call_id="c1", aor="bob@example.com"), 1.0)
    j.store.flush()  # then kill -9
    engine, result = restored(tmp_path / "state", 0.0, wall_offset=1010.0)  # restarted 10 s later
    assert result.skipped == 0
    out = engine.handle(j.wire.register(T0 + 20.5), 10.5)
    assert [(d.action.value, d.reason) for d in out] == (
        [("fake_call", Reason.MISSED)] if pushed else [("none", Reason.TOO_LATE)]
    )
