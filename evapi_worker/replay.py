"""Replay captured events through the engine, in seconds, with any settings.

Input is capture files (``run --capture``) or JSON lines, one v1 event per
line (see docs/protocol.md), optionally with ``"recv"``, the time the worker
received it (the event's ``ts`` otherwise). Records from several files are
merged by receive time. Time is virtual: the engine is fed each event at its
original receive time, and ticked in between, so settle delays and expiry
happen as they did, without waiting. Events take the live worker's path
(protocol.py): a REGISTER belongs to the node whose connection brought it,
and its deadline counts from its timestamp. Nothing is sent anywhere.
"""

from __future__ import annotations

import array
import heapq
import json
import math
import os
import sys
import time
import typing
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TextIO

import msgspec

from .capture import CaptureError, ClockNote, Item, PushNote, Record, item_time, read_capture
from .config import ConfigError, with_changes
from .core.clocks import NodeClocks
from .core.engine import Act, Action, Decision, Engine, EngineSettings, Judged, Reason
from .core.events import TYPE_NAMES, Event, EventError, decode_event
from .core.protocol import Decided, Protocol
from .files import FileProblem, open_regular

__all__ = [
    "FigureSink",
    "ReplayResult",
    "apply_what_if",
    "decision_json",
    "decision_text",
    "decode_records",
    "differences",
    "iso_time",
    "load_records",
    "progress_stream",
    "replay",
    "replay_decoded",
]

_PROGRESS_EVERY = 100_000


def _read_jsonl(path: Path, problems: list[str]) -> Iterator[Record]:
    with os.fdopen(open_regular(path), "rb") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                problems.append(f"{path}:{number}: not JSON ({exc}), skipped")
                continue
            if not isinstance(obj, dict):
                problems.append(f"{path}:{number}: not a JSON object, skipped")
                continue
            recv = obj.pop("recv", obj.get("ts"))
            try:
                received = float(recv)
            except (TypeError, ValueError):
                problems.append(f"{path}:{number}: no usable 'recv' or 'ts', skipped")
                continue
            node = obj.get("node") if isinstance(obj.get("node"), str) else "?"
            seq = obj.get("seq") if isinstance(obj.get("seq"), int) else None
            yield Record(str(node), seq, received, json.dumps(obj).encode())


def _open(path: Path, problems: list[str]) -> Iterator[Item]:
    # A regular file only: a FIFO would hang the replay, a device never end.
    with os.fdopen(open_regular(path), "rb") as f:
        first = f.read(1)
    if first in (b"{", b"\n", b" ", b"\r"):
        return _read_jsonl(path, problems)
    return read_capture(path, problems)


def load_records(paths: Iterable[Path], problems: list[str]) -> Iterator[Item]:
    """What the files hold (frames, and the captures' and journals' push
    and clock notes), merged by time (each file is in order), read as they
    are needed."""
    streams = []
    for path in paths:
        try:
            streams.append(_open(path, problems))
        except (OSError, CaptureError) as exc:
            problems.append(str(exc) if isinstance(exc, FileProblem) else f"{path}: {exc}")
    if len(streams) == 1:
        return streams[0]
    return heapq.merge(*streams, key=item_time)


class FigureSink(typing.Protocol):
    """What the report learns from a replay as it runs (report.Figures)."""

    widest: float  # the longest window it draws: a second engine judges with it

    def seen(self, node: str, received: float) -> None: ...
    def decided(self, d: Decision, now: float, after_push: float | None) -> None: ...
    def judged(self, judged: Judged) -> None: ...


# A push is matched with the REGISTERs of this long after it (the providers
# keep a push an hour at most): the index stays bounded on a long capture.
_PUSH_KEPT: Final = 3600.0


class _Pushes:
    """The pushes noted, by (call, account, device), for as long as a
    REGISTER may answer them."""

    def __init__(self) -> None:
        self.count = 0
        self._sent: dict[tuple[str, str, str], float] = {}

    def add(self, note: PushNote) -> None:
        self.count += 1
        sent = self._sent
        key = (note.call_id, note.aor, note.device)
        sent.pop(key, None)
        sent[key] = note.sent  # newest last: the oldest are dropped first
        while sent:
            oldest = next(iter(sent.items()))
            if oldest[1] >= note.sent - _PUSH_KEPT:
                break
            del sent[oldest[0]]

    def delay(self, d: Decision) -> float | None:
        """Seconds from the push of ``d``'s device for its call to its
        REGISTER (the node's clock against the worker's: both on NTP)."""
        if d.reason is Reason.DUPLICATE or not self._sent:
            return None
        # Notes written before they kept the account name the call by its Call-ID alone.
        at = self._sent.get((d.call_id, d.aor, d.device))
        if at is None:
            at = self._sent.get((d.call_id, "", d.device))
        return None if at is None else d.ts - at


@dataclass
class ReplayResult:
    """What a replay decided, counted as it ran (and every decision, when kept)."""

    decisions: list[Decision] = field(default_factory=list)  # kept: replay(keep=True)
    events: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    records: int = 0
    pushes: int = 0  # push notes read
    decided: Counter[str] = field(default_factory=Counter)  # "action:reason"
    late: Counter[str] = field(default_factory=Counter)  # actions by how the call ended
    delays: array.array[float] = field(default_factory=lambda: array.array("d"))  # since_start, no duplicates
    woke: array.array[float] = field(default_factory=lambda: array.array("d"))  # push to REGISTER
    what_if: ReplayResult | None = None  # the replay with other settings, in the same pass

    def add(self, d: Decision, after_push: float | None) -> None:
        action = d.action.value
        self.decided[f"{action}:{d.reason}"] += 1
        if isinstance(d, Act):
            self.late[d.call.end.value] += 1
        if d.reason is not Reason.DUPLICATE:
            self.delays.append(d.since_start)
        if after_push is not None:
            self.woke.append(after_push)

    def summary(self) -> dict[str, object]:
        actions: Counter[str] = Counter()
        for key, n in self.decided.items():
            action = key.partition(":")[0]
            if action != Action.NONE.value:
                actions[action] += n
        delays, woke = sorted(self.delays), sorted(self.woke)
        push_figures = {
            "pushes": self.pushes,
            "registered_after_push": len(woke),
            **{f"p{q}": _percentile(woke, q) for q in (50, 90, 99)},
        }
        return {
            "records": self.records,
            "events": dict(sorted(self.events.items())),
            "event_errors": dict(sorted(self.errors.items())),
            "calls": self.events.get("call_start", 0),
            "late_registrations": dict(sorted(self.late.items())),
            "actions": dict(sorted(actions.items())),
            "decisions": dict(sorted(self.decided.items())),
            "wakeup_delay_seconds": {f"p{q}": _percentile(delays, q) for q in (50, 90, 99)},
            **({"push_wakeup_seconds": push_figures} if self.pushes else {}),
        }


def _percentile(values: list[float], q: int) -> float | None:
    if not values:
        return None
    index = min(len(values) - 1, max(0, math.ceil(q / 100 * len(values)) - 1))
    return round(values[index], 3)


def replay(
    records: Iterable[Item],
    settings: EngineSettings,
    progress: TextIO | None = None,
    *,
    keep: bool = True,
    on_decision: Callable[[Decision], None] | None = None,
    figures: FigureSink | None = None,
    what_if: EngineSettings | None = None,
) -> ReplayResult:
    """Feed the records through a fresh engine under virtual time, as they
    are read. ``keep``: the result holds every decision (else they are only
    counted, and told to ``on_decision``); ``figures`` learns what the report
    draws, and ``what_if`` is replayed too, in the same pass."""
    return replay_decoded(
        decode_records(records, progress), settings, keep=keep, on_decision=on_decision, figures=figures,
        what_if=what_if,
    )  # fmt: skip


Decoded = tuple[float, str, "Event | str | PushNote | ClockNote"]
"""A record's receive time, the node that sent it, and its event or the
reason it is not one; or a note's time, "" and the note."""


def decode_records(records: Iterable[Item], progress: TextIO | None = None) -> Iterator[Decoded]:
    """Each record's receive time, node and event (or why it has none), in
    order; the notes among them as they come."""
    decode = decode_event
    count = 0
    for item in records:
        if type(item) is not Record:
            yield item_time(item), "", item  # type: ignore[misc]
            continue
        node, _seq, received, payload = item
        count += 1
        try:
            yield received, node, decode(payload)
        except EventError as exc:
            yield received, node, exc.reason
        if progress is not None and count % _PROGRESS_EVERY == 0:
            print(f"\rreplayed {count:,} records", end="", file=progress, flush=True)
    if progress is not None and count >= _PROGRESS_EVERY:
        print(file=progress)


class _Lane:
    """One engine of a replay, and what it decided."""

    def __init__(
        self,
        settings: EngineSettings,
        pushes: _Pushes,
        keep: bool,
        on_decision: Callable[[Decision], None] | None = None,
        figures: FigureSink | None = None,
        judged: Callable[[Judged], None] | None = None,
    ) -> None:
        """``judged``: the lane is there for the devices its engine judges
        (told to it); its decisions are not counted."""
        # Virtual time is the wall clock of the receive times: a node's clock
        # is the wall clock, as it is for a live worker until a ping measures it.
        engine = Engine(settings)
        engine.on_judged = judged
        self.protocol = Protocol(engine, NodeClocks(wall_offset=0.0))
        self._counted = judged is None
        self.feed = self.protocol.feed
        self.result = ReplayResult()
        self._pushes = pushes
        self._keep = keep
        self._on_decision = on_decision
        self._figures = figures

    def decided(self, decisions: Sequence[Decision], now: float) -> None:
        if not self._counted:
            return
        result, figures = self.result, self._figures
        for d in decisions:
            after = self._pushes.delay(d)
            result.add(d, after)
            if self._keep:
                result.decisions.append(d)
            if self._on_decision is not None:
                self._on_decision(d)
            if figures is not None:
                figures.decided(d, now, after)


def replay_decoded(
    decoded: Iterable[Decoded],
    settings: EngineSettings,
    *,
    keep: bool = True,
    on_decision: Callable[[Decision], None] | None = None,
    figures: FigureSink | None = None,
    what_if: EngineSettings | None = None,
) -> ReplayResult:
    """:func:`replay` for records already decoded. The notes reach the
    engine where they are among the events, as they reached the live one: a
    pushed device's REGISTER is judged from its push, a node's REGISTER
    times are placed with its clock as measured then.

    Other engines may run beside in the same pass: with ``what_if``, one
    with those settings (its result, every decision kept, in
    :attr:`ReplayResult.what_if`); with ``figures``, one with the widest
    window the report draws, whose every device judged against its window
    is told: what each window would serve follows from that one pass."""
    pushes = _Pushes()
    lane = _Lane(settings, pushes, keep, on_decision, figures)
    lanes = [lane]
    if what_if is not None:
        lanes.append(_Lane(what_if, pushes, True))
    if figures is not None:
        widest = msgspec.structs.replace(settings, window=figures.widest)
        lanes.append(_Lane(widest, pushes, False, judged=figures.judged))
    result = lane.result
    by_type: dict[type, int] = {}
    # The loop runs for every record: names are bound locally. The protocol
    # decides what is due before each event, as it does live.
    feed, others = lane.feed, lanes[1:]
    seen = figures.seen if figures is not None else None
    count = 0
    now = 0.0  # the receive time of the record being replayed
    for now, node, event in decoded:
        kind = type(event)
        if kind is PushNote:
            note: PushNote = event  # type: ignore[assignment]
            pushes.add(note)
            if note.lasts is not None:  # older notes do not say how long their push was kept
                for each in lanes:
                    each.protocol.engine.pushed(note.call_id, note.aor, note.device, note.lasts, note.sent)
            continue
        if kind is ClockNote:
            clock: ClockNote = event  # type: ignore[assignment]
            for each in lanes:
                each.protocol.measured(clock.node, clock.offset, clock.uncertainty, clock.at)
            continue
        count += 1
        if seen is not None:
            seen(node, now)
        if isinstance(event, str):  # why the record is no event
            result.errors[event] += 1
            continue
        by_type[kind] = by_type.get(kind, 0) + 1
        got = feed(node, event, now)  # type: ignore[arg-type]
        if type(got) is Decided and got.decisions:
            lane.decided(got.decisions, now)
        for other in others:
            got = other.feed(node, event, now)  # type: ignore[arg-type]
            if type(got) is Decided and got.decisions:
                other.decided(got.decisions, now)
    for each in lanes:
        # Let pending decisions settle (at the last record's time, for the figures).
        each.decided(each.protocol.tick(now + 86_400), now)
        each.result.records = count
        each.result.pushes = pushes.count
        each.result.errors = result.errors
        for kind, n in by_type.items():
            each.result.events[TYPE_NAMES[kind]] += n
    if what_if is not None:
        result.what_if = lanes[1].result
    return result


def decision_json(d: Decision) -> str:
    """One decision as a JSON line: fixed key order, rounded numbers."""
    return json.dumps(
        {
            "time": round(d.ts, 6),
            "node": d.node,
            "call_id": d.call_id,
            "account": d.aor,
            "device": d.device,
            "action": d.action.value,
            "reason": d.reason,
            "since_start": round(d.since_start, 3),
            "since_end": None if d.since_end is None else round(d.since_end, 3),
        },
        ensure_ascii=False,
    )


def decision_text(d: Decision) -> str:
    end = "" if d.since_end is None else f", {d.since_end:.1f} s after it ended"
    return (
        f"{iso_time(d.ts)} {d.node} call={d.call_id} account={d.aor} device={d.device}: {d.action.value} {d.reason} "
        f"(registered {d.since_start:.1f} s after the call started{end})"
    )


def iso_time(ts: float) -> str:
    """A Unix time as ISO 8601 UTC, to the millisecond."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts * 1000) % 1000:03d}Z"


_WHAT_IF: Final = {
    "window": "window",
    "anchor": "anchor",
    "settle": "settle",
    "deadline": "deadline",
    "ring_timeout": "ring_timeout",
    "strategy": "strategy",
    "ua": "user_agents",
}


def apply_what_if(settings: EngineSettings, changes: list[str]) -> EngineSettings:
    """``["window=30", "anchor=start"]`` applied to ``settings``, checked by
    the same rules as the settings file; ConfigError names the problem."""
    values: dict[str, object] = {}
    for change in changes:
        key, eq, value = change.partition("=")
        if not eq:
            raise ConfigError("--what-if", f"{change!r}: expected KEY=VALUE")
        if key not in _WHAT_IF:
            raise ConfigError("--what-if", f"{key!r}: what-if takes {', '.join(_WHAT_IF)}")
        values[_WHAT_IF[key]] = [v for v in value.split(",") if v] if key == "ua" else value
    names = {f"engine.{field}": f"--what-if {key}" for key, field in _WHAT_IF.items()}
    return with_changes(settings, values, "engine", names)


def differences(base: ReplayResult, other: ReplayResult) -> list[tuple[str, str, str, str]]:
    """(call_id, device, base outcome, other outcome) where the two runs decided differently."""

    def index(result: ReplayResult) -> dict[tuple[str, str, str], str]:
        return {(d.call_id, d.aor, d.device): f"{d.action.value}:{d.reason}" for d in result.decisions}

    a, b = index(base), index(other)
    keys = sorted(set(a) | set(b))
    return [(k[0], k[2], a.get(k, "-"), b.get(k, "-")) for k in keys if a.get(k) != b.get(k)]


def progress_stream() -> TextIO | None:
    return sys.stderr if sys.stderr.isatty() else None
