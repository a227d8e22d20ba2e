"""Capture files and replay, with a capture recorded from real Kamailio and SIPp."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import trio

from evapi_worker.capture import CaptureError, CaptureSettings, CaptureWriter, ClockNote, PushNote, frames, read_capture
from evapi_worker.cli import main
from evapi_worker.config import Config
from evapi_worker.core.engine import EngineSettings, Strategy
from evapi_worker.replay import apply_what_if, decision_json, load_records, replay
from evapi_worker.service import Service

from ..helpers import frame

DATA = Path(__file__).parent.parent / "data"
STORY = DATA / "story.evcap"


def test_replay_of_a_real_capture_decides_as_the_live_worker_did() -> None:
    problems: list[str] = []
    result = replay(load_records([STORY], problems), EngineSettings())
    assert problems == []
    lines = "".join(decision_json(d) + "\n" for d in result.decisions)
    assert lines == (DATA / "story.expected.jsonl").read_text()
    summary = result.summary()
    assert summary["calls"] == 4
    assert summary["late_registrations"] == {"answered": 1, "cancelled": 1}
    assert summary["actions"] == {"fake_call": 2}
    # The awake iPhone that rang with the real call and re-registered after
    # it was missed gets nothing, as live.
    decisions = summary["decisions"]
    assert isinstance(decisions, dict) and decisions["none:rang"] == 1


def test_json_output_is_byte_identical_run_to_run(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", str(STORY), "--json"]) == 0
    first = capsys.readouterr().out
    assert main(["replay", str(STORY), "--json"]) == 0
    assert capsys.readouterr().out == first
    *decisions, summary = first.splitlines()
    assert decisions == (DATA / "story.expected.jsonl").read_text().splitlines()
    assert json.loads(summary)["summary"]["events"]["call_start"] == 4


def test_what_if_shows_the_decisions_that_differ(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", str(STORY), "--json", "--anchor", "end", "--what-if", "window=0.5"]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    diffs = summary["what_if"]["differences"]
    # Only the answered call's iPhone was later than half a second.
    assert diffs == [
        {
            "call_id": "story-answered@127.0.0.1",
            "device": "urn:uuid:iphone",
            "base": "fake_call:answered",
            "what_if": "none:too_late",
        }
    ]
    assert main(["replay", str(STORY), "--anchor", "end", "--what-if", "anchor=start", "--what-if", "window=2"]) == 0
    text = capsys.readouterr().out
    assert "what if anchor=start window=2: 1 decisions differ" in text
    assert "story-missed@127.0.0.1" in text


def test_text_output_tells_each_decision_and_a_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", str(STORY)]) == 0
    out = capsys.readouterr().out
    assert (
        "call=story-answered@127.0.0.1 account=bob@voip.example.org device=urn:uuid:iphone: fake_call answered" in out
    )
    assert '"wakeup_delay_seconds"' in out


def test_json_lines_input_reports_bad_lines_by_number(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    jsonl = tmp_path / "events.jsonl"
    lines = [json.dumps({**json.loads(r.payload), "recv": r.received}) for r in frames(read_capture(STORY))]
    lines.insert(2, "{not json")
    jsonl.write_text("\n".join(lines) + "\n")
    assert main(["replay", str(jsonl), "--json"]) == 0
    captured = capsys.readouterr()
    assert f"{jsonl}:3: not JSON" in captured.err
    assert captured.out.splitlines()[:-1] == (DATA / "story.expected.jsonl").read_text().splitlines()


def test_torn_last_record_is_reported_and_the_rest_read(tmp_path: Path) -> None:
    torn = tmp_path / "torn.evcap"
    data = STORY.read_bytes()
    torn.write_bytes(data[:-7])
    problems: list[str] = []
    records = list(frames(read_capture(torn, problems)))
    assert len(records) == len(list(frames(read_capture(STORY)))) - 1
    assert problems and "torn last record" in problems[0]


def test_not_a_capture(tmp_path: Path) -> None:
    junk = tmp_path / "junk.evcap"
    junk.write_bytes(b"\x93\x01\x02\x03")
    with pytest.raises(CaptureError):
        list(read_capture(junk))


async def test_writer_rotates_keeps_a_bounded_number_of_files_and_reads_back(tmp_path: Path) -> None:
    settings = CaptureSettings(tmp_path / "cap", max_bytes=4096, keep=3)
    writer = CaptureWriter(settings)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        for i in range(400):
            assert writer.record("kam1", i, 1_700_000_000 + i, b'{"event":"x","n":%d}' % i)
            if i % 50 == 0:
                await trio.sleep(0.01)  # let the writer write and rotate
        await trio.sleep(0.2)
        nursery.cancel_scope.cancel()
    files = sorted(settings.folder.iterdir())
    assert len(files) == 3
    # They hold push tokens: readable by the worker's user alone.
    assert {f.stat().st_mode & 0o777 for f in files} == {0o600}
    records = [r for f in files for r in frames(read_capture(f))]
    assert [r.seq for r in records] == list(range(records[0].seq or 0, 400))
    assert records[-1].seq == 399 and records[-1].payload == b'{"event":"x","n":399}'


def test_writer_drops_and_counts_when_the_disk_is_behind(tmp_path: Path) -> None:
    writer = CaptureWriter(CaptureSettings(tmp_path, queue=2))  # its task is not running: a stalled disk
    results = [writer.record("kam1", i, 0.0, b"{}") for i in range(5)]
    assert results == [True, True, False, False, False]
    assert writer.dropped == 3


def test_replay_with_a_missing_file_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", "/nonexistent.evcap"]) == 2
    assert "not a file" in capsys.readouterr().err


async def test_service_captures_every_frame_it_receives_even_bad_ones(tmp_path: Path) -> None:
    config = Config(capture=CaptureSettings(tmp_path / "cap"))
    service = Service(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        good = b'{"event":"call_answered","node":"kam1","ts":1700000000.5,"seq":41,"call_id":"c1"}'
        service.on_frame("kam1", good, trio.current_time())
        service.on_frame("kam1", b"{not json", trio.current_time())
        await trio.sleep(0.2)
        nursery.cancel_scope.cancel()
    (file,) = sorted((tmp_path / "cap").iterdir())
    records = list(frames(read_capture(file)))
    assert [(r.node, r.seq, r.payload) for r in records] == [("kam1", 41, good), ("kam1", None, b"{not json")]
    assert abs(records[0].received - time.time()) < 60
    assert service.metrics.value("evapi_worker_capture_records_total") == 2


async def test_a_full_disk_pauses_the_capture_and_costs_the_worker_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    errors: list[int] = []
    writer = CaptureWriter(CaptureSettings(tmp_path / "cap"), on_error=lambda n, exc: errors.append(n), retry=0.05)
    real_write = writer._write
    full = True

    def write(batch: list[tuple[str, int | None, float, bytes] | PushNote | ClockNote]) -> None:
        if full:
            raise OSError(28, "No space left on device")
        real_write(batch)

    monkeypatch.setattr(writer, "_write", write)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        assert writer.record("kam1", 1, 1_700_000_000.0, b'{"event":"x"}')
        with trio.fail_after(5):
            while not errors:
                await trio.sleep(0.01)
        full = False  # space freed: capture resumes
        assert writer.record("kam1", 2, 1_700_000_001.0, b'{"event":"y"}')
        with trio.fail_after(5):
            while writer.written < 1:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert writer.lost == 1 and errors == [1]
    (file,) = (tmp_path / "cap").iterdir()
    assert [r.seq for r in frames(read_capture(file))] == [2]


async def test_replay_decides_per_node_as_the_live_worker_did(tmp_path: Path) -> None:
    # Two nodes whose routes name themselves otherwise than the worker
    # does (EVW_NODE "edge-a" on the connection the worker calls "kam1").
    # Live, a REGISTER belongs to the connection it came in on; replayed
    # from the capture, too.
    config = Config(capture=CaptureSettings(tmp_path / "cap"), engine=EngineSettings(strategy=Strategy.MESSAGE))
    service = Service(config)
    live: list[str] = []
    service.decision_listeners.append(lambda d: live.append(decision_json(d)))
    t0 = time.time()

    register = {"contact": "sip:d@127.0.0.1:7000", "src_ip": "127.0.0.1", "src_port": 7000, "proto": "udp",
                "expires": 600, "user_agent": "LinphoneiOS/5"}  # fmt: skip
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        for n, (conn, named) in enumerate((("kam1", "edge-a"), ("kam2", "edge-b"))):
            call = f"c{n}"
            events: list[tuple[str, float, dict[str, Any]]] = [
                # A newer config's field, an acknowledgement nobody waits
                # for, a refusal, an event type this version does not know:
                # each is what it is in the replay as it was live.
                ("call_start", t0, {"call_id": call, "aor": f"u{n}@x", "from_user": "alice", "newer": 1}),
                ("cmd_result", t0 + 0.1, {"id": "gone-1", "ok": True}),
                ("refused", t0 + 0.2, {"reason": "call_id_nul"}),
                ("presence", t0 + 0.3, {}),
                ("call_cancelled", t0 + 0.5, {"call_id": call}),
                ("register", t0 + 1, {"aor": f"u{n}@x", "instance": f"<i{n}>", **register}),
            ]
            for seq, (event, ts, fields) in enumerate(events, 1):
                service.on_frame(conn, frame(event, ts, seq, node=named, **fields), trio.current_time())
            service.on_frame(conn, b'{"event": "register", "node": 7}', trio.current_time())
        await trio.sleep(0.3)
        nursery.cancel_scope.cancel()
    assert [json.loads(line)["node"] for line in live] == ["kam1", "kam2"]
    problems: list[str] = []
    replayed = replay(load_records(sorted((tmp_path / "cap").iterdir()), problems), config.engine)
    assert problems == []
    assert [decision_json(d) for d in replayed.decisions] == live
    # What each frame was, live and replayed, per reason and type.
    live_types: Counter[str] = Counter()
    for (_node, etype), count in service.metrics.events.counts.items():
        live_types[etype] += count
    assert replayed.events == +live_types
    live_errors: Counter[str] = Counter()
    for family in service.metrics.registry.collect():
        if family.name == "evapi_worker_event_errors":
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.value:
                    live_errors[sample.labels["reason"]] += int(sample.value)
    assert replayed.errors == live_errors == {"unknown_type": 2, "bad_type": 2}


@pytest.mark.parametrize(("lasts", "decided"), [(30.0, ["fake_call:missed"]), (None, [])])
def test_replay_judges_a_pushed_device_from_its_push_as_the_live_worker(
    tmp_path: Path, lasts: float | None, decided: list[str]
) -> None:
    # The push accepted 0.05 s into the call, kept 30 s by Apple; the
    # caller gave up at 1 s; the phone was back and registered at 20.5 s.
    # A note from before the notes said how long a push is kept: the window
    # (the call forgotten 15 s after it ended: nothing to decide).
    t0 = 1_700_000_000.0
    folder = tmp_path / "cap"
    writer = CaptureWriter(CaptureSettings(folder))
    register = {"aor": "bob@x", "instance": "<urn:uuid:i1>", "contact": "sip:d@127.0.0.1:7000", "src_ip": "127.0.0.1",
                "src_port": 7000, "proto": "udp", "expires": 600, "user_agent": "LinphoneiOS/5"}  # fmt: skip
    events: list[tuple[str, float, dict[str, Any]]] = [
        ("call_start", t0, {"call_id": "c1", "aor": "bob@x", "from_user": "alice"}),
        ("call_cancelled", t0 + 1, {"call_id": "c1", "aor": "bob@x"}),
        ("register", t0 + 20.5, register),
    ]
    items: list[tuple[str, int | None, float, bytes] | PushNote | ClockNote] = []
    for n, (kind, ts, fields) in enumerate(events):
        items.append(("kam1", n + 1, ts, json.dumps({"event": kind, "ts": ts, "seq": n + 1, "node": "kam1",
                                                     "boot": 1, **fields}).encode()))  # fmt: skip
        if kind == "call_start":
            items.append(PushNote(t0 + 0.05, "c1", "urn:uuid:i1", "apns", "bob@x", lasts))
    folder.mkdir()
    writer._write(items)
    writer._close()
    result = replay(load_records(sorted(folder.iterdir()), []), EngineSettings())
    assert [f"{d.action.value}:{d.reason}" for d in result.decisions] == decided
    assert result.pushes == 1


@pytest.mark.parametrize("change", ["window=3", "anchor=start", "strategy=message", "settle=0"])
def test_a_what_if_in_the_same_pass_decides_as_its_own_replay(change: str) -> None:
    records = list(load_records([STORY], []))
    base, what_if = EngineSettings(), apply_what_if(EngineSettings(), [change])
    together = replay(records, base, what_if=what_if)
    assert together.what_if is not None
    alone = replay(records, what_if)
    assert [decision_json(d) for d in together.what_if.decisions] == [decision_json(d) for d in alone.decisions]
    assert together.what_if.summary() == alone.summary()
    assert [decision_json(d) for d in together.decisions] == [decision_json(d) for d in replay(records, base).decisions]
