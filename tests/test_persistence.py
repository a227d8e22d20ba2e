"""State on disk while running: snapshots, journals, actions saved at stop."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import trio

from evapi_worker.config import Config
from evapi_worker.engine import Act, Decision, Engine, EngineSettings, Reason
from evapi_worker.evapi_client import NodeAddress
from evapi_worker.persistence import StateStore
from evapi_worker.service import Service
from evapi_worker.sipp_runner import Outcome, SippSettings
from evapi_worker.state import decode_snapshot

from .evapi_server import EvapiServer
from .helpers import Wire
from .sipp_device import LOGS_COMPLETED, fake_sipp

T0 = 1_700_000_000.0


class Errors(list[tuple[str, OSError]]):
    def __call__(self, file: str, exc: OSError) -> None:
        self.append((file, exc))


def ended_call(engine: Engine, wire: Wire) -> None:
    engine.handle(wire.start(T0), 0.0)
    engine.handle(wire.cancelled(T0 + 1), 1.0)


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


def test_the_journal_keeps_an_action_begun_after_the_last_snapshot(tmp_path: Path) -> None:
    errors = Errors()
    wire, engine = Wire(), Engine()
    store = StateStore(tmp_path / "state", errors)
    store.restore(engine, 0.0)
    ended_call(engine, wire)
    store.write(*store.snapshot(engine, 1.5))
    (act,) = engine.handle(wire.register(T0 + 2), 2.0)
    store.note_action(act.call_id, act.device)  # then kill -9: no snapshot

    def after_crash(journal: bool) -> list[Decision]:
        if not journal:
            for path in tmp_path.glob("state.journal.*"):
                path.rename(tmp_path / ("hidden-" + path.name))
        restored = Engine()
        StateStore(tmp_path / "state", errors).restore(restored, 10.0)
        for path in tmp_path.glob("hidden-*"):
            path.rename(tmp_path / path.name.removeprefix("hidden-"))
        return restored.handle(wire.register(T0 + 3), 10.5)

    assert [d.action.value for d in after_crash(journal=False)] == ["fake_call"]  # what the journal prevents
    assert [(d.action.value, d.reason) for d in after_crash(journal=True)] == [("none", Reason.DUPLICATE)]
    assert errors == []


def test_a_torn_last_journal_record_is_ignored(tmp_path: Path) -> None:
    wire, engine = Wire(), Engine()
    store = StateStore(tmp_path / "state", Errors())
    ended_call(engine, wire)
    store.write(*store.snapshot(engine, 1.5))
    store.note_action("call-1", "urn:uuid:iphone-1")
    store.close()
    (journal,) = tmp_path.glob("state.journal.*")
    with journal.open("ab") as f:
        f.write(b"\x92\xa6call-")  # a record cut short by a crash
    restored = Engine()
    result = StateStore(tmp_path / "state", Errors()).restore(restored, 5.0)
    assert result.journaled == 1


def test_a_written_snapshot_removes_the_journals_it_contains(tmp_path: Path) -> None:
    wire, engine = Wire(), Engine()
    store = StateStore(tmp_path / "state", Errors())
    ended_call(engine, wire)
    store.note_action("call-1", "a")
    data, journal = store.snapshot(engine, 1.5)
    store.note_action("call-1", "b")  # after the snapshot: in the next journal
    assert len(list(tmp_path.glob("state.journal.*"))) == 2
    assert store.write(data, journal)
    (left,) = tmp_path.glob("state.journal.*")
    assert left.name == f"state.journal.{journal}"
    assert decode_snapshot((tmp_path / "state").read_bytes(), "state").journal == journal


def test_a_failed_snapshot_is_reported_and_keeps_the_previous_file(tmp_path: Path) -> None:
    errors = Errors()
    wire, engine = Wire(), Engine()
    store = StateStore(tmp_path / "state", errors)
    assert store.write(*store.snapshot(engine, 0.0))
    before = (tmp_path / "state").read_bytes()
    ended_call(engine, wire)
    (tmp_path / "state.tmp").mkdir()  # the temporary file cannot be made
    assert not store.write(*store.snapshot(engine, 1.5))
    assert [file for file, _ in errors] == ["snapshot"]
    assert (tmp_path / "state").read_bytes() == before


def frame(event: str, ts: float, seq: int, **fields: Any) -> bytes:
    return json.dumps({"event": event, "node": "kam1", "ts": ts, "seq": seq, "boot": 1, **fields}).encode()


async def test_a_running_worker_keeps_its_state_on_disk_within_the_interval(tmp_path: Path) -> None:
    state = tmp_path / "state"
    service = Service(Config(state_file=state, state_interval=0.2))
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        now = trio.current_time()
        service.on_frame("kam1", frame("call_start", T0, 1, call_id="c1", aor="bob@x", from_user="a"), now)
        service.on_frame("kam1", frame("call_cancelled", T0 + 1, 2, call_id="c1"), now)
        await trio.sleep(0.5)
        nursery.cancel_scope.cancel()  # no stop(): a crash, as far as the file knows
    snapshot = decode_snapshot(state.read_bytes(), str(state))
    assert [c.call_id for c in snapshot.engine.calls] == ["c1"]


REG = {
    "contact": "sip:bob@127.0.0.1:5099", "src_ip": "127.0.0.1", "proto": "udp", "expires": 600,
    "user_agent": "LinphoneiOS/5",
}  # fmt: skip


async def test_actions_waiting_at_stop_are_saved_and_begin_after_the_restart(tmp_path: Path) -> None:
    state = tmp_path / "state"
    slow, quick = tmp_path / "slow", tmp_path / "quick"
    slow.mkdir()
    quick.mkdir()
    server = EvapiServer()
    async with trio.open_nursery() as outer:
        await server.start(outer)
        node = NodeAddress("kam1", "127.0.0.1", server.port, "127.0.0.1", 5099)

        def config(sipp: Path) -> Config:
            return Config(
                nodes=(node,), engine=EngineSettings(deadline=30), state_file=state, shutdown_grace=0.3,
                sipp=SippSettings(binary=str(sipp), max_concurrent=1),
            )  # fmt: skip

        first = Service(config(fake_sipp(slow, "sleep 30")))
        deferred: list[str] = []
        first.actions.outcome_listeners.append(
            lambda act, outcome: deferred.append(act.device) if outcome is Outcome.DEFERRED else None
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(first.run)
            await server.wait_for(lambda: bool(server.streams))
            await server.send(
                server.event("call_start", T0, call_id="c1", aor="bob@x", from_user="alice")
                + server.event("call_answered", T0 + 1, call_id="c1")
                + b"".join(
                    server.event("register", T0 + 2, aor="bob@x", src_port=6000 + i, instance=f"<i{i}>", **REG)
                    for i in range(3)
                )
            )
            with trio.fail_after(5):
                while first.runner.running + first.runner.waiting < 3:
                    await trio.sleep(0.01)
            await first.stop()
            nursery.cancel_scope.cancel()
        m = first.metrics
        assert m.value("evapi_worker_fake_calls_total", {"outcome": "killed"}) == 1  # SIPp was running
        assert m.value("evapi_worker_fake_calls_total", {"outcome": "deferred"}) == 2
        assert len(decode_snapshot(state.read_bytes(), str(state)).actions) == 2

        done: list[str] = []
        second = Service(config(fake_sipp(quick, LOGS_COMPLETED)))
        second.actions.outcome_listeners.append(
            lambda act, outcome: done.append(act.device) if outcome is Outcome.COMPLETED else None
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(second.run)
            with trio.fail_after(5):
                while len(done) < 2:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        outer.cancel_scope.cancel()
    assert len(deferred) == 2
    assert sorted(done) == sorted(deferred)  # the killed one is not sent again
