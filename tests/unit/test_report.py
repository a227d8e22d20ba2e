"""The replay report: its figures are the engine's decisions, its page is safe."""

from __future__ import annotations

import io
import json
from pathlib import Path

import msgspec
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from evapi_worker import cli
from evapi_worker import replay as replay_module
from evapi_worker.capture import CaptureSettings, CaptureWriter, Item, PushNote, Record, frames
from evapi_worker.cli import main
from evapi_worker.core.engine import Act, Anchor, EngineSettings, Reason
from evapi_worker.core.records import frame
from evapi_worker.replay import load_records, replay
from evapi_worker.report import MAX_SECONDS, figures, render_html

DATA = Path(__file__).parent.parent / "data"
STORY = DATA / "story.evcap"


def story() -> list[Record]:
    problems: list[str] = []
    records = list(frames(load_records([STORY], problems)))
    assert problems == []
    return records


def test_wakeup_delays_are_the_decisions_split_by_in_time_and_how_the_call_ended() -> None:
    records = story()
    result, figs = figures(records, EngineSettings())
    wake = figs["wakeup_delay"]
    assert isinstance(wake, dict)
    totals = {name: sum(values) for name, values in wake["series"].items()}
    # The story: a ringing iPhone and one that rang (in time), one late after
    # an answered call, one late after a missed call.
    assert totals == {"in_time": 2, "answered": 1, "declined": 0, "missed": 1}
    in_time = [d for d in result.decisions if d.reason in (Reason.RINGING, Reason.RANG)]
    for d in in_time:
        assert wake["series"]["in_time"][int(d.since_start)] >= 1


def _sixty_replays(records: list[Item], settings: EngineSettings) -> tuple[list[int], list[int]]:
    """What each window serves, the slow way: the capture replayed once per window."""
    served, too_late = [], []
    for window in range(1, MAX_SECONDS + 1):
        run = replay(records, msgspec.structs.replace(settings, window=float(window)))
        served.append(sum(isinstance(d, Act) for d in run.decisions))
        too_late.append(sum(d.reason is Reason.TOO_LATE for d in run.decisions))
    return served, too_late


@pytest.mark.parametrize("capture", ["story.evcap", "demo.evcap"])
@pytest.mark.parametrize("anchor", [Anchor.END, Anchor.START])
def test_one_pass_coverage_is_what_a_replay_per_window_decides(capture: str, anchor: Anchor) -> None:
    records: list[Item] = list(load_records([DATA / capture], []))
    settings = EngineSettings(anchor=anchor)
    cover = figures(records, settings)[1]["coverage"]
    assert isinstance(cover, dict)
    assert cover["windows"] == list(range(1, MAX_SECONDS + 1))
    assert (cover["served"], cover["too_late"]) == _sixty_replays(records, settings)
    if capture == "story.evcap" and anchor is Anchor.START:
        # The two late iPhones registered 1.9 and 2.6 s after their calls began.
        assert cover["served"][:3] == [0, 1, 2] and cover["too_late"][:3] == [2, 1, 0]


@settings(max_examples=60, deadline=None)
@given(
    late=st.lists(st.tuples(st.floats(0.2, 80.0), st.floats(0.0, 3.0), st.booleans()), min_size=1, max_size=6),
    read_late=st.floats(0.0, 2.0),
    pushed=st.booleans(),
)
def test_one_pass_coverage_equals_sixty_replays_on_random_calls(
    late: list[tuple[float, float, bool]], read_late: float, pushed: bool
) -> None:
    """Calls ending at once or after ringing, iPhones registering from
    before the end to past every window, REGISTERs read late (past the
    settle delay, past the call's expiry), pushed or not."""
    t0 = 1_700_000_000.0
    items: list[tuple[float, Item]] = []
    seq = 0

    def add(when: float, received: float, **event: object) -> None:
        nonlocal seq
        seq += 1
        payload = json.dumps({"node": "kam1", "ts": when, "seq": seq, "boot": 1, **event}).encode()
        items.append((received, Record("kam1", seq, received, payload)))

    for n, (after, ring, answered) in enumerate(late):
        start = t0 + 100 * n
        add(start, start, event="call_start", call_id=f"c{n}", aor=f"u{n}@x", from_user="a")
        end = start + ring
        add(end, end + 0.01, event="call_answered" if answered else "call_cancelled", call_id=f"c{n}", aor=f"u{n}@x")
        if pushed:
            items.append((start + 0.05, PushNote(start + 0.05, f"c{n}", f"urn:uuid:i{n}", "apns", f"u{n}@x", 30.0)))
        reg = start + after
        add(reg, reg + read_late, event="register", aor=f"u{n}@x", contact=f"sip:i{n}@127.0.0.1:5060",
            src_ip="127.0.0.1", src_port=5060, proto="udp", expires=600, user_agent="LinphoneiOS/5",
            instance=f"<urn:uuid:i{n}>")  # fmt: skip
    records = [item for _, item in sorted(items, key=lambda x: x[0])]
    for anchor in (Anchor.END, Anchor.START):
        config = EngineSettings(anchor=anchor, settle=0.5)
        cover = figures(records, config)[1]["coverage"]
        assert isinstance(cover, dict)
        assert (cover["served"], cover["too_late"]) == _sixty_replays(records, config)


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
    page = render_html(figures(records, EngineSettings())[1])
    assert hostile not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page


def test_json_carries_the_same_figures(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", str(STORY), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    records = story()
    expected = figures(records, EngineSettings())[1]
    assert summary["figures"] == json.loads(json.dumps(expected))


async def test_a_capture_with_push_notes_measures_the_wake_up_from_the_push(tmp_path: Path) -> None:
    records = story()
    decided = [d for d in replay(records, EngineSettings()).decisions if d.reason is not Reason.DUPLICATE]
    writer = CaptureWriter(CaptureSettings(tmp_path / "cap"))
    # Each device registered 1.25 s after its push; the notes among the
    # frames in time order, as the live worker writes them.
    notes = [PushNote(d.ts - 1.25, d.call_id, d.device, "apns") for d in decided]
    notes.append(PushNote(records[0].received, "never-registered", "dev", "fcm"))
    timed: list[tuple[float, int, Record | PushNote]] = [(r.received, 1, r) for r in records]
    timed += [(n.sent, 0, n) for n in notes]
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        for _, _, item in sorted(timed, key=lambda x: (x[0], x[1])):
            assert writer.note_push(item) if isinstance(item, PushNote) else writer.record(*item)
        await trio.sleep(0.2)
        nursery.cancel_scope.cancel()
    files = sorted((tmp_path / "cap").iterdir())
    with files[-1].open("ab") as f:  # a note another writer got wrong
        f.write(frame(["u", "not a time", "c", "bob@x", "d", 30.0, "apns"]))
    problems: list[str] = []
    loaded = list(load_records(files, problems))
    assert list(frames(loaded)) == records
    assert len(problems) == 1 and "malformed record" in problems[0]
    result, figs = figures(loaded, EngineSettings())
    assert result.summary()["push_wakeup_seconds"] == {
        "pushes": len(decided) + 1, "registered_after_push": len(decided), "p50": 1.25, "p90": 1.25, "p99": 1.25,
    }  # fmt: skip
    push = figs["push_wakeup"]
    assert isinstance(push, dict)
    assert {k: sum(v) for k, v in push["series"].items()} == {"in_time": 2, "answered": 1, "declined": 0, "missed": 1}
    assert all(v[2] == sum(v) for v in push["series"].values())  # the 1.0-1.5 s bin
    page = render_html(figs)
    assert "How long after the push?" in page and page.count("<svg") == 4
    # A capture without push notes (this one predates them) shows no such figure.
    assert "push_wakeup_seconds" not in replay(story(), EngineSettings()).summary()
    assert "How long after the push?" not in render_html(figures(records, EngineSettings())[1])


def test_a_long_report_shows_its_progress_on_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One pass makes the report: the replay's progress is the report's."""
    folder = tmp_path / "cap"
    folder.mkdir()
    writer = CaptureWriter(CaptureSettings(folder))
    t0 = 1_700_000_000.0
    writer._write(
        [("kam1", n, t0 + n / 100, json.dumps({"event": "call_answered", "node": "kam1", "ts": t0 + n / 100,
          "seq": n, "boot": 1, "call_id": f"c{n}", "aor": "bob@x"}).encode()) for n in range(1, 2501)]
    )  # fmt: skip
    writer._close()
    terminal = io.StringIO()
    monkeypatch.setattr(replay_module, "_PROGRESS_EVERY", 1000)
    monkeypatch.setattr(cli, "progress_stream", lambda: terminal)
    out = tmp_path / "report.html"
    assert main(["replay", *map(str, folder.iterdir()), "--report", str(out)]) == 0
    assert "replayed 1,000 records" in terminal.getvalue() and "replayed 2,000 records" in terminal.getvalue()
    assert out.read_text().startswith("<!doctype html>")
