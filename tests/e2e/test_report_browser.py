"""The replay report in a real browser: headless Chromium renders the charts
of a capture recorded from real Kamailio and SIPp, with no console error."""

from __future__ import annotations

import itertools
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from evapi_worker.cli import main

from ..png import colours

CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (Debian package chromium)")
DATA = Path(__file__).parent.parent / "data"
# Captures recorded from real Kamailio and SIPp: `evapi-worker demo --capture`
# (two late iPhones) and tests/record_capture.py (four calls, two in time).
DEMO, STORY = DATA / "demo.evcap", DATA / "story.evcap"
# The series colours of the report (report._COLORS).
IN_TIME, ANSWERED, MISSED, TOO_LATE = (76, 120, 168), (84, 162, 75), (245, 133, 24), (178, 121, 162)


def chromium(tmp_path: Path, page: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run(
        [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'chromium-profile'}", "--enable-logging=stderr", "--v=0",
            "--window-size=820,2200", *args, page.as_uri(),
        ],
        capture_output=True, text=True, timeout=90, check=False,
    )  # fmt: skip


def console_messages(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


@needs_chromium
def test_console_errors_are_seen(tmp_path: Path) -> None:
    # The check below would notice a page that goes wrong.
    bad = tmp_path / "bad.html"
    bad.write_text("<!doctype html><body><script>missingFunction();</script></body>")
    assert console_messages(chromium(tmp_path, bad, "--dump-dom").stderr) != []


@needs_chromium
@pytest.mark.parametrize(
    ("capture", "bars", "painted_colours"),
    [(DEMO, 4, (ANSWERED, MISSED, TOO_LATE)), (STORY, 6, (IN_TIME, ANSWERED, MISSED, TOO_LATE))],
)
def test_the_report_renders_its_charts_in_headless_chromium(
    tmp_path: Path, capture: Path, bars: int, painted_colours: tuple[tuple[int, int, int], ...]
) -> None:
    report = tmp_path / "report.html"
    assert main(["replay", str(capture), "--report", str(report)]) == 0
    dom = chromium(tmp_path, report, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert console_messages(dom.stderr) == []
    assert len(re.findall(r"<svg class=\"chart\"", dom.stdout)) == 3
    assert len(re.findall(r"<rect class=\"bar\"", dom.stdout)) == bars
    assert len(re.findall(r"<polyline class=\"line\"", dom.stdout)) == 2
    shot = tmp_path / "report.png"
    run = chromium(tmp_path, report, f"--screenshot={shot}")
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    painted = colours(shot)
    # The charts were painted: bars in each series colour the story has, and
    # the coverage lines.
    for colour in painted_colours:
        assert painted[colour] > 50, (colour, painted.most_common(8))


def _tick_labels(svg: str) -> list[tuple[float, str]]:
    """The x-axis tick labels of one chart: (x, text)."""
    return [
        (float(x), text)
        for x, y, text in re.findall(r'<text class="tick" x="([\d.]+)" y="([\d.]+)" text-anchor="middle">([^<]*)<', svg)
    ]


@needs_chromium
def test_the_report_of_a_million_events_renders_with_round_ticks_that_never_overlap(tmp_path: Path) -> None:
    """A million events in one capture (a busy node's quarter of an hour):
    made in one pass, drawn with round ticks on every axis, one clock per
    axis."""
    from bench.replay import write_capture

    capture = tmp_path / "million.evcap"
    events = write_capture(capture, 310_000)
    assert events > 1_000_000
    report = tmp_path / "report.html"
    assert main(["replay", str(capture), "--report", str(report)]) == 0
    page = report.read_text()
    charts = re.findall(r'<svg class="chart".*?</svg>', page)
    assert len(charts) == 3
    for svg in charts:
        ticks = _tick_labels(svg)
        assert len(ticks) >= 3
        for (x1, a), (x2, b) in itertools.pairwise(ticks):
            assert x2 - x1 > 7 * max(len(a), len(b)), (a, b, x2 - x1)  # about 7 px a character
        for _, label in ticks:
            assert re.fullmatch(r"\d+\+?", label), label  # whole numbers
        counts = [float(t) for t in re.findall(r'text-anchor="end">([^<]*)<', svg)]
        step = counts[1] - counts[0]
        assert step / 10 ** math.floor(math.log10(step)) in (1, 2, 5), counts
    # The timeline's clock is the receive clock, named with the capture's start.
    assert "since 2023-11-14T22:13:20.000Z, the first record&#x27;s receive time" in page
    dom = chromium(tmp_path, report, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert console_messages(dom.stderr) == []
    assert len(re.findall(r"<svg class=\"chart\"", dom.stdout)) == 3
