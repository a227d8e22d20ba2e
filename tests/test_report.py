"""The replay report: its figures are the engine's decisions, its page is safe."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest
import trio

from evapi_worker.capture import CaptureSettings, CaptureWriter, PushNote, Record, frames
from evapi_worker.cli import main
from evapi_worker.core.engine import Act, EngineSettings, Reason
from evapi_worker.core.records import frame
from evapi_worker.replay import load_records, replay
from evapi_worker.report import MAX_SECONDS, figures, render_html

DATA = Path(__file__).parent / "data"
STORY = DATA / "story.evcap"


def story() -> list[Record]:
    problems: list[str] = []
    records = list(frames(load_records([STORY], problems)))
    assert problems == []
    return records


def test_wakeup_delays_are_the_decisions_split_by_in_time_and_how_the_call_ended() -> None:
    records = story()
    result = replay(records, EngineSettings())
    wake = figures(records, EngineSettings(), result)["wakeup_delay"]
    assert isinstance(wake, dict)
    totals = {name: sum(values) for name, values in wake["series"].items()}
    # The story: a ringing iPhone and one that rang (in time), one late after
    # an answered call, one late after a missed call.
    assert totals == {"in_time": 2, "answered": 1, "declined": 0, "missed": 1}
    in_time = [d for d in result.decisions if d.reason in (Reason.RINGING, Reason.RANG)]
    for d in in_time:
        assert wake["series"]["in_time"][int(d.since_start)] >= 1


def test_the_coverage_curve_is_what_the_engine_decides_for_each_window() -> None:
    records = story()
    settings = EngineSettings()
    cover = figures(records, settings, replay(records, settings))["coverage"]
    assert isinstance(cover, dict)
    assert cover["windows"] == list(range(1, MAX_SECONDS + 1))
    for window in (1, 2, 3, 15):
        run = replay(records, msgspec.structs.replace(settings, window=float(window)))
        acts = sum(isinstance(d, Act) for d in run.decisions)
        late = sum(d.reason is Reason.TOO_LATE for d in run.decisions)
        assert (cover["served"][window - 1], cover["too_late"][window - 1]) == (acts, late)
    # The two late iPhones registered 1.9 and 2.6 s after their calls began.
    assert cover["served"][:3] == [0, 1, 2] and cover["too_late"][:3] == [2, 1, 0]


def test_the_report_is_one_page_with_nothing_fetched(tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    assert main(["replay", str(STORY), "--report", str(out)]) == 0
    page = out.read_text()
    assert page.startswith("<!doctype html>")
    assert page.count("<svg") == 3  # delays, coverage, one node's timeline
    assert "<script" not in page and "http://" not in page and "https://" not in page and "src=" not in page


def test_event_data_in_the_page_is_escaped() -> None:
    hostile = '<script>alert("x")</script>'
    t0 = 1_700_000_000.0
    lines = [
        {"event": "call_start", "node": hostile, "ts": t0, "seq": 1, "boot": 1, "call_id": "c1", "aor": "bob@x",
         "from_user": "a"},
        {"event": "call_cancelled", "node": hostile, "ts": t0 + 1, "seq": 2, "boot": 1, "call_id": "c1"},
        {"event": "register", "node": hostile, "ts": t0 + 2, "seq": 3, "boot": 1, "aor": "bob@x",
         "contact": "sip:b@127.0.0.1", "src_ip": "127.0.0.1", "src_port": 5060, "proto": "udp", "expires": 60,
         "user_agent": "LinphoneiOS", "instance": "<i1>"},
    ]  # fmt: skip
    records = [Record(hostile, i, t0 + i, json.dumps(obj).encode()) for i, obj in enumerate(lines)]
    result = replay(records, EngineSettings())
    page = render_html(figures(records, EngineSettings(), result))
    assert hostile not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page


def test_json_carries_the_same_figures(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", str(STORY), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    records = story()
    expected = figures(records, EngineSettings(), replay(records, EngineSettings()))
    assert summary["figures"] == json.loads(json.dumps(expected))


async def test_a_capture_with_push_notes_measures_the_wake_up_from_the_push(tmp_path: Path) -> None:
    records = story()
    decided = [d for d in replay(records, EngineSettings()).decisions if d.reason is not Reason.DUPLICATE]
    writer = CaptureWriter(CaptureSettings(tmp_path / "cap"))
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        for record in records:
            assert writer.record(*record)
        for d in decided:  # each device registered 1.25 s after its push
            assert writer.note_push(PushNote(d.ts - 1.25, d.call_id, d.device, "apns"))
        assert writer.note_push(PushNote(records[0].received, "never-registered", "dev", "fcm"))
        await trio.sleep(0.2)
        nursery.cancel_scope.cancel()
    files = sorted((tmp_path / "cap").iterdir())
    with files[-1].open("ab") as f:  # a note another writer got wrong
        f.write(frame(["u", "not a time", "c", "bob@x", "d", 30.0, "apns"]))
    problems: list[str] = []
    loaded = list(load_records(files, problems))
    assert list(frames(loaded)) == records
    assert len(problems) == 1 and "malformed record" in problems[0]
    result = replay(loaded, EngineSettings())
    assert result.summary()["push_wakeup_seconds"] == {
        "pushes": len(decided) + 1, "registered_after_push": len(decided), "p50": 1.25, "p90": 1.25, "p99": 1.25,
    }  # fmt: skip
    push = figures(loaded, EngineSettings(), result)["push_wakeup"]
    assert isinstance(push, dict)
    assert {k: sum(v) for k, v in push["series"].items()} == {"in_time": 2, "answered": 1, "declined": 0, "missed": 1}
    assert all(v[2] == sum(v) for v in push["series"].values())  # the 1.0-1.5 s bin
    page = render_html(figures(loaded, EngineSettings(), result))
    assert "How long after the push?" in page and page.count("<svg") == 4
    # A capture without push notes (this one predates them) shows no such figure.
    assert "push_wakeup_seconds" not in replay(story(), EngineSettings()).summary()
    assert "How long after the push?" not in render_html(
        figures(records, EngineSettings(), replay(records, EngineSettings()))
    )
