"""Figures from a replay, and a self-contained HTML report that draws them.

Every figure comes from the engine's own decisions under the replay clock:
the wake-up delays are the decisions' ``since_start``, split by what the
engine decided (in time for the real INVITE, or late) and by how the call
ended; the coverage curve comes from the same pass, from an engine with
the widest window drawn that tells each device it judges (its lateness,
and until when its call was remembered): served at window w are those
remembered under w (the engine's own rule,
:func:`~evapi_worker.core.engine.remembered`) and at most w late. Nothing
here re-implements a rule of the engine.

The report is one HTML file with inline SVG and CSS: no script, nothing
fetched, it opens from disk.
"""

from __future__ import annotations

import dataclasses
import html
import itertools
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import Final, TextIO

import msgspec

from .capture import Item
from .core.engine import Act, Decision, EngineSettings, Judged, Reason, remembered
from .replay import ReplayResult, iso_time, replay

__all__ = [
    "MAX_SECONDS",
    "Figures",
    "figures",
    "render_html",
]

# Wake-up delays are drawn in one-second bins up to this; later ones share a
# last bin. The coverage curve covers the windows 1..MAX_SECONDS.
MAX_SECONDS: Final = 60
# Wake-up after the push: half-second bins up to this.
PUSH_BIN: Final = 0.5
PUSH_MAX_SECONDS: Final = 20
_IN_TIME: Final = frozenset((Reason.RINGING, Reason.RANG))
_SERIES: Final = ("in_time", "answered", "declined", "missed")
_LABELS: Final = {
    "in_time": "in time for the real INVITE",
    "answered": "late: answered elsewhere",
    "declined": "late: declined elsewhere",
    "missed": "late: missed",
    "served": "would get a fake call",
    "too_late": "would come too late",
}
_COLORS: Final = {
    "in_time": "#4c78a8",
    "answered": "#54a24b",
    "declined": "#e45756",
    "missed": "#f58518",
    "served": "#54a24b",
    "too_late": "#b279a2",
}


class Figures:
    """Every figure of the report, learnt as one replay runs (it is the
    replay's :class:`~evapi_worker.replay.FigureSink`): memory bounded by
    the histograms, not by the capture's length."""

    widest: float = float(MAX_SECONDS)

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        self._first: float | None = None
        self._last: float | None = None
        self._nodes: set[str] = set()
        self._wake = {name: [0] * (MAX_SECONDS + 1) for name in _SERIES}
        self._push_last = int(PUSH_MAX_SECONDS / PUSH_BIN)
        self._push = {name: [0] * (self._push_last + 1) for name in _SERIES}
        # Windows 1..MAX_SECONDS: changes of the served and too-late counts
        # at each window (a device served from window w on adds one at w).
        self._served = [0] * (MAX_SECONDS + 2)
        self._too_late = [0] * (MAX_SECONDS + 2)
        # Late devices by (node, kind) and receive second.
        self._late: dict[tuple[str, str], Counter[int]] = defaultdict(Counter)

    def seen(self, node: str, received: float) -> None:
        if self._first is None:
            self._first = received
        self._last = received
        if len(self._nodes) < _MAX_NODES:
            self._nodes.add(node)

    def decided(self, d: Decision, now: float, after_push: float | None) -> None:
        category = _category(d)
        if category is not None:
            self._wake[category][min(MAX_SECONDS, max(0, math.floor(d.since_start)))] += 1
            if after_push is not None:
                self._push[category][min(self._push_last, max(0, math.floor(after_push / PUSH_BIN)))] += 1
        if isinstance(d, Act) or d.reason is Reason.TOO_LATE:
            kind = "too_late" if d.reason is Reason.TOO_LATE else d.reason.value
            self._late[d.node, kind][math.floor(now)] += 1

    def judged(self, judged: Judged) -> None:
        """A device the widest window's engine judged: the windows under
        which its call was still remembered, and those it was in time for."""
        first = _first_remembered(judged)
        if first is None:
            return  # forgotten under every window drawn
        # In time under a window w when its lateness is at most w.
        served_from = max(first, math.ceil(judged.lateness))
        if served_from <= MAX_SECONDS:
            self._served[served_from] += 1
        self._too_late[first] += 1
        self._too_late[min(served_from, MAX_SECONDS + 1)] -= 1

    def result(self, replayed: ReplayResult) -> dict[str, object]:
        """The figures, as JSON-ready data, once ``replayed`` is done."""
        return {
            "settings": msgspec.to_builtins(self.settings),
            "capture": self._span(replayed),
            "wakeup_delay": {"bin_seconds": 1, "last_bin_and_later": MAX_SECONDS, "series": self._wake},
            "push_wakeup": {
                "pushes": replayed.pushes,
                "bin_seconds": PUSH_BIN,
                "last_bin_and_later": PUSH_MAX_SECONDS,
                "series": self._push,
            },
            "coverage": self._coverage(),
            "timeline": self._timeline(),
        }

    def _span(self, replayed: ReplayResult) -> dict[str, object]:
        first, last = self._first, self._last
        return {
            "first": iso_time(first) if first is not None else None,
            "last": iso_time(last) if last is not None else None,
            "seconds": round(last - first, 3) if first is not None and last is not None else 0,
            "records": replayed.records,
            "nodes": sorted(self._nodes),
            "events": dict(sorted(replayed.events.items())),
            "event_errors": dict(sorted(replayed.errors.items())),
        }

    def _coverage(self) -> dict[str, object]:
        windows = list(range(1, MAX_SECONDS + 1))
        served, too_late = list(itertools.accumulate(self._served)), list(itertools.accumulate(self._too_late))
        return {
            "windows": windows,
            "configured": self.settings.window,
            "anchor": self.settings.anchor.value,
            "served": served[1 : MAX_SECONDS + 1],
            "too_late": too_late[1 : MAX_SECONDS + 1],
        }

    def _timeline(self) -> dict[str, object]:
        """Late devices over time, per node, on the receive clock from the
        capture's first record: the fake calls decided (by how the call
        ended) and the devices too late for one."""
        if not self._late or self._first is None or self._last is None:
            return {"bucket_seconds": 0, "start": None, "nodes": {}}
        start = math.floor(self._first)
        span = max(self._last - start, 1.0)
        bucket = _time_step(span / _BUCKETS)
        buckets = int(span // bucket) + 1
        nodes: dict[str, dict[str, list[int]]] = {}
        for (node, kind), seconds in sorted(self._late.items()):
            series = nodes.setdefault(
                node, {name: [0] * buckets for name in ("answered", "declined", "missed", "too_late")}
            )
            for second, n in seconds.items():
                series[kind][min(buckets - 1, max(0, int((second - start) // bucket)))] += n
        return {"bucket_seconds": bucket, "start": iso_time(start), "nodes": nodes}


def figures(
    records: Iterable[Item], settings: EngineSettings, progress: TextIO | None = None
) -> tuple[ReplayResult, dict[str, object]]:
    """Replay ``records`` once with ``settings`` and make every figure of
    the report from that one pass."""
    sink = Figures(settings)
    replayed = replay(records, settings, progress, figures=sink)
    return replayed, sink.result(replayed)


def _first_remembered(judged: Judged) -> int | None:
    """The shortest whole window (1..MAX_SECONDS) under which the call was
    still remembered when the device was judged; None if none was that long."""
    if judged.seen_at == -math.inf:
        return 1
    window = max(1, math.floor(judged.seen_at - judged.forget_base) - 1)
    while window <= MAX_SECONDS:
        if remembered(judged, float(window)):
            return window
        window += 1
    return None


def _category(d: Decision) -> str | None:
    if d.reason is Reason.DUPLICATE:
        return None  # a second REGISTER of a device already decided
    if d.reason in _IN_TIME:
        return "in_time"
    return str(d.end.reason) if d.end is not None else None  # answered, declined or missed


# Round steps for a time axis: seconds, minutes, hours, days.
_TIME_STEPS: Final = (
    1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400, 172800, 604800
)  # fmt: skip
_LATE_KINDS: Final = ("answered", "declined", "missed", "too_late")
_BUCKETS: Final = 40  # at most about this many bars on a timeline
_MAX_NODES: Final = 256


def _time_step(raw: float) -> float:
    """The round time step (seconds to weeks) at least ``raw``."""
    for step in _TIME_STEPS:
        if step >= raw:
            return float(step)
    return 86400.0 * math.ceil(raw / 86400)


def _nice_step(raw: float) -> float:
    """1, 2 or 5 times a power of ten, at least ``raw``."""
    power = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if factor * power >= raw:
            return float(factor * power)
    return float(10 * power)


# -- drawing ---------------------------------------------------------------

_W: Final = 760
_H: Final = 300
_LEFT: Final = 56
_RIGHT: Final = 16
_TOP: Final = 16
_BOTTOM: Final = 44


@dataclasses.dataclass(frozen=True)
class _Series:
    key: str
    values: Sequence[float]


def _y_ticks(top: float) -> tuple[float, list[float]]:
    step = max(1.0, _nice_step(max(top, 1.0) / 5))  # counts: whole numbers
    ceiling = step * math.ceil(max(top, 1.0) / step)
    return ceiling, [step * i for i in range(round(ceiling / step) + 1)]


def _frame(ceiling: float, ticks: list[float], x_labels: list[tuple[float, str]], x_title: str, y_title: str) -> str:
    plot_h = _H - _TOP - _BOTTOM
    parts = []
    for t in ticks:
        y = _TOP + plot_h - t / ceiling * plot_h
        parts.append(f'<line class="grid" x1="{_LEFT}" x2="{_W - _RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>')
        parts.append(f'<text class="tick" x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{t:g}</text>')
    for x, label in x_labels:
        parts.append(f'<text class="tick" x="{x:.1f}" y="{_H - _BOTTOM + 16}" text-anchor="middle">{_e(label)}</text>')
    parts.append(
        f'<text class="axis" x="{(_LEFT + _W - _RIGHT) / 2}" y="{_H - 6}" text-anchor="middle">{_e(x_title)}</text>'
    )
    parts.append(
        f'<text class="axis" transform="translate(14 {_TOP + plot_h / 2}) rotate(-90)" text-anchor="middle">'
        f"{_e(y_title)}</text>"
    )
    return "".join(parts)


def _stacked_bars(
    series: list[_Series],
    x_labels: list[str],
    x_title: str,
    y_title: str,
    label_every: int,
    marker: tuple[float, str] | None = None,
) -> str:
    n = len(x_labels)
    totals = [sum(s.values[i] for s in series) for i in range(n)]
    if not any(totals):
        return _empty("nothing to draw: no such decisions in this capture")
    ceiling, ticks = _y_ticks(max(totals))
    plot_w, plot_h = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM
    slot = plot_w / n
    labels = [(_LEFT + slot * (i + 0.5), x_labels[i]) for i in range(0, n, label_every)]
    parts = [_frame(ceiling, ticks, labels, x_title, y_title)]
    for i in range(n):
        base = 0.0
        for s in series:
            value = s.values[i]
            if not value:
                continue
            height = value / ceiling * plot_h
            y = _TOP + plot_h - (base + value) / ceiling * plot_h
            parts.append(
                f'<rect class="bar" x="{_LEFT + slot * i + 1:.1f}" y="{y:.1f}" width="{max(slot - 2, 1):.1f}" '
                f'height="{height:.1f}" fill="{_COLORS[s.key]}"><title>{_e(x_labels[i])}: '
                f"{_e(_LABELS[s.key])} {value:g}</title></rect>"
            )
            base += value
    if marker is not None:
        parts.append(_marker(_LEFT + slot * marker[0], marker[1]))
    return _svg("".join(parts)) + _legend(series)


def _lines(series: list[_Series], xs: list[float], x_title: str, y_title: str, marker: tuple[float, str]) -> str:
    top = max((max(s.values) for s in series if s.values), default=0)
    if not top:
        return _empty("nothing to draw: no late devices in this capture")
    ceiling, ticks = _y_ticks(top)
    plot_w, plot_h = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM
    lo, hi = xs[0], xs[-1]

    def x_at(x: float) -> float:
        return _LEFT + (x - lo) / (hi - lo) * plot_w

    labels = [(x_at(x), f"{x:g}") for x in xs if x == lo or x % 5 == 0]
    parts = [_frame(ceiling, ticks, labels, x_title, y_title)]
    for s in series:
        points = " ".join(
            f"{x_at(x):.1f},{_TOP + plot_h - v / ceiling * plot_h:.1f}" for x, v in zip(xs, s.values, strict=True)
        )
        parts.append(f'<polyline class="line" points="{points}" stroke="{_COLORS[s.key]}"/>')
        for x, v in zip(xs, s.values, strict=True):
            parts.append(
                f'<circle class="point" cx="{x_at(x):.1f}" cy="{_TOP + plot_h - v / ceiling * plot_h:.1f}" r="2.5" '
                f'fill="{_COLORS[s.key]}"><title>window {x:g} s: {_e(_LABELS[s.key])} {v:g}</title></circle>'
            )
    if lo <= marker[0] <= hi:
        parts.append(_marker(x_at(marker[0]), marker[1]))
    return _svg("".join(parts)) + _legend(series)


def _marker(x: float, label: str) -> str:
    return (
        f'<line class="marker" x1="{x:.1f}" x2="{x:.1f}" y1="{_TOP}" y2="{_H - _BOTTOM}"/>'
        f'<text class="marker-label" x="{x + 4:.1f}" y="{_TOP + 12}">{_e(label)}</text>'
    )


def _svg(body: str) -> str:
    return f'<svg class="chart" viewBox="0 0 {_W} {_H}" width="{_W}" height="{_H}" role="img">{body}</svg>'


def _legend(series: list[_Series]) -> str:
    items = "".join(
        f'<li><span class="swatch" style="background:{_COLORS[s.key]}"></span>{_e(_LABELS[s.key])}</li>' for s in series
    )
    return f'<ul class="legend">{items}</ul>'


def _empty(text: str) -> str:
    return f'<p class="empty">{_e(text)}</p>'


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _table(rows: list[tuple[str, object]]) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


_CSS: Final = """
body { font: 14px/1.45 system-ui, sans-serif; color: #222; margin: 24px auto; max-width: 800px; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 32px; }
p.note { color: #555; margin-top: 4px; } p.empty { color: #777; font-style: italic; }
svg.chart { display: block; max-width: 100%; height: auto; background: #fff; }
.grid { stroke: #e4e4e4; } .tick { font-size: 11px; fill: #555; } .axis { font-size: 12px; fill: #333; }
.line { fill: none; stroke-width: 2; } .marker { stroke: #222; stroke-dasharray: 4 3; }
.marker-label { font-size: 11px; fill: #222; }
ul.legend { list-style: none; padding: 0; margin: 6px 0 0 56px; display: flex; flex-wrap: wrap; gap: 4px 16px; }
.swatch { display: inline-block; width: 11px; height: 11px; margin-right: 6px; vertical-align: -1px; }
table { border-collapse: collapse; } th, td { text-align: left; padding: 2px 12px 2px 0; vertical-align: top; }
th { font-weight: 600; color: #444; }
"""


def render_html(fig: dict[str, object], title: str = "evapi-worker replay report") -> str:
    """The report page for :func:`figures`' data."""
    wake = fig["wakeup_delay"]
    cover = fig["coverage"]
    timeline = fig["timeline"]
    capture = fig["capture"]
    settings = fig["settings"]
    assert isinstance(wake, dict) and isinstance(cover, dict) and isinstance(timeline, dict)
    assert isinstance(capture, dict) and isinstance(settings, dict)
    window = float(cover["configured"])
    anchor = str(cover["anchor"])
    counts = wake["series"]
    bins = [f"{i}" if i < MAX_SECONDS else f"{MAX_SECONDS}+" for i in range(MAX_SECONDS + 1)]
    late_total = sum(sum(counts[k]) for k in ("answered", "declined", "missed"))
    in_time_total = sum(counts["in_time"])
    wake_marker = (window, f"window {window:g} s") if anchor == "start" and window <= MAX_SECONDS else None
    sections = [
        f"<h1>{_e(title)}</h1>",
        f'<p class="note">Capture {_e(capture["first"])} to {_e(capture["last"])} '
        f"({_e(capture['seconds'])} s), {_e(capture['records'])} records from "
        f"{_e(', '.join(capture['nodes']) or 'no node')}. Every figure is what the engine decided under the "
        "replay clock.</p>",
        "<h2>How late do the phones wake?</h2>",
        f'<p class="note">Push devices of called accounts: REGISTER time minus call start. {in_time_total} '
        f"registered while the call rang (tsilo gave them the real INVITE), {late_total} after it ended.</p>",
        _stacked_bars(
            [_Series(k, counts[k]) for k in _SERIES],
            bins,
            "seconds from call start to REGISTER",
            "devices",
            5,
            wake_marker,
        ),
        *_push_section(fig.get("push_wakeup")),
        "<h2>What would each window serve?</h2>",
        f'<p class="note">The capture replayed with windows of 1 to {MAX_SECONDS} s (from the call\'s {_e(anchor)}): '
        "late devices that would get a fake call, and those that would come too late for one. "
        "The dashed line is the configured window.</p>",
        _lines(
            [_Series("served", cover["served"]), _Series("too_late", cover["too_late"])],
            [float(w) for w in cover["windows"]],
            "window (seconds)",
            "devices",
            (window, f"configured {window:g} s"),
        ),
        "<h2>Late devices over time, per node</h2>",
        '<p class="note">Fake calls decided, by how the call ended, and devices too late for one. '
        "A capture holds what Kamailio sent, not what SIPp did: fake-call outcomes are in the live metrics.</p>",
    ]
    nodes = timeline["nodes"]
    assert isinstance(nodes, dict)
    if not nodes:
        sections.append(_empty("no late device in this capture"))
    bucket = float(timeline["bucket_seconds"] or 1)
    for node, series in nodes.items():
        n = len(series["answered"])
        step, unit, unit_name = _time_labels(bucket, n * bucket)
        labels = [_g(i * bucket / unit) for i in range(n)]
        sections.append(f"<h3>{_e(node)}</h3>")
        sections.append(
            _stacked_bars(
                [_Series(k, series[k]) for k in _LATE_KINDS],
                labels,
                f"{unit_name} since {timeline['start']}, the first record's receive time "
                f"(bars of {_fmt_seconds(bucket)})",
                "devices",
                round(step / bucket),
            )
        )
    events = capture["events"]
    errors = capture["event_errors"]
    assert isinstance(events, dict) and isinstance(errors, dict)
    sections += [
        "<h2>Settings used</h2>",
        _table([(k, ", ".join(map(str, v)) if isinstance(v, list | tuple) else v) for k, v in settings.items()]),
        "<h2>The capture</h2>",
        _table(
            [("first record", capture["first"]), ("last record", capture["last"]), ("records", capture["records"])]
            + [(f"events: {k}", v) for k, v in events.items()]
            + [(f"bad frames: {k}", v) for k, v in errors.items()]
        ),
    ]
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>\n" + "\n".join(sections) + "\n</body></html>\n"
    )


def _push_section(push: object) -> list[str]:
    """The wake-up after the push, when the capture noted pushes."""
    if not isinstance(push, dict) or not push.get("pushes"):
        return []
    counts = push["series"]
    step = float(push["bin_seconds"])
    n = len(counts["in_time"])
    bins = [f"{i * step:g}" if i < n - 1 else f"{i * step:g}+" for i in range(n)]
    woke = sum(sum(values) for values in counts.values())
    return [
        "<h2>How long after the push?</h2>",
        f'<p class="note">{_e(push["pushes"])} pushes accepted by Apple or Google; {woke} of the devices '
        "registered afterwards (REGISTER time at the node minus the worker's time of the push).</p>",
        _stacked_bars([_Series(k, counts[k]) for k in _SERIES], bins, "seconds from push to REGISTER", "devices", 4),
    ]


def _time_labels(bucket: float, span: float) -> tuple[float, float, str]:
    """A round step between labels on a time axis of bars ``bucket`` long
    (a multiple of it, at most about eight labels), the unit the labels
    count in and its name."""
    step = next(
        (float(s) for s in _TIME_STEPS if s >= span / 8 and s % bucket == 0), bucket * math.ceil(span / 8 / bucket)
    )
    if step >= 3600:
        return step, 3600.0, "hours"
    if step >= 60:
        return step, 60.0, "minutes"
    return step, 1.0, "seconds"


def _g(value: float) -> str:
    """A label's number: no trailing zeros, no exponent."""
    return f"{value:.3f}".rstrip("0").rstrip(".")


def _fmt_seconds(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:g} h"
    if seconds >= 60:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"
