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

import heapq
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TextIO

from .capture import CaptureError, ClockNote, Item, PushNote, Record, item_time, read_capture
from .config import ConfigError, with_changes
from .core.clocks import NodeClocks
from .core.engine import Act, Decision, Engine, EngineSettings, Reason
from .core.events import TYPE_NAMES, Event, EventError, decode_event
from .core.protocol import Decided, Protocol
from .files import FileProblem, open_regular

__all__ = [
    "ReplayResult",
    "after_push",
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


@dataclass
class ReplayResult:
    decisions: list[Decision] = field(default_factory=list)
    events: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    records: int = 0
    pushes: list[PushNote] = field(default_factory=list)  # the pushes the captures noted

    def summary(self) -> dict[str, object]:
        actions = [d for d in self.decisions if isinstance(d, Act)]
        delays = sorted(d.since_start for d in self.decisions if d.reason is not Reason.DUPLICATE)
        woke = sorted(delay for _, delay in after_push(self.decisions, self.pushes))
        push_figures = {
            "pushes": len(self.pushes),
            "registered_after_push": len(woke),
            **{f"p{q}": _percentile(woke, q) for q in (50, 90, 99)},
        }
        return {
            "records": self.records,
            "events": dict(sorted(self.events.items())),
            "event_errors": dict(sorted(self.errors.items())),
            "calls": self.events.get("call_start", 0),
            "late_registrations": dict(sorted(Counter(d.call.end.value for d in actions).items())),
            "actions": dict(sorted(Counter(d.action.value for d in actions).items())),
            "decisions": dict(sorted(Counter(f"{d.action.value}:{d.reason}" for d in self.decisions).items())),
            "wakeup_delay_seconds": {f"p{q}": _percentile(delays, q) for q in (50, 90, 99)},
            **({"push_wakeup_seconds": push_figures} if self.pushes else {}),
        }


def after_push(decisions: Iterable[Decision], pushes: Iterable[PushNote]) -> list[tuple[Decision, float]]:
    """Each decision on a device the worker had pushed for that call, with
    the seconds from the push to its REGISTER (the node's clock against the
    worker's: both on NTP)."""
    # Notes written before they kept the account name the call by its Call-ID alone.
    sent = {(p.call_id, p.aor, p.device): p.sent for p in pushes}
    found = []
    for d in decisions:
        at = sent.get((d.call_id, d.aor, d.device))
        if at is None:
            at = sent.get((d.call_id, "", d.device))
        if at is not None and d.reason is not Reason.DUPLICATE:
            found.append((d, d.ts - at))
    return found


def _percentile(values: list[float], q: int) -> float | None:
    if not values:
        return None
    index = min(len(values) - 1, max(0, math.ceil(q / 100 * len(values)) - 1))
    return round(values[index], 3)


def replay(records: Iterable[Item], settings: EngineSettings, progress: TextIO | None = None) -> ReplayResult:
    """Feed the records through a fresh engine under virtual time."""
    return replay_decoded(decode_records(records, progress), settings)


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


def replay_decoded(decoded: Iterable[Decoded], settings: EngineSettings) -> ReplayResult:
    """:func:`replay` for records already decoded (the report replays one
    capture once per window). The notes reach the engine where they are
    among the events, as they reached the live one: a pushed device's
    REGISTER is judged from its push, a node's REGISTER times are placed
    with its clock as measured then."""
    engine = Engine(settings)
    pushed = engine.pushed
    result = ReplayResult()
    out = result.decisions
    notes = result.pushes
    by_type: dict[type, int] = {}
    # Virtual time is the wall clock of the receive times: a node's clock
    # is the wall clock, as it is for a live worker until a ping measures it.
    protocol = Protocol(engine, NodeClocks(wall_offset=0.0))
    # The loop runs for every record: names are bound locally. The protocol
    # decides what is due before each event, as it does live.
    feed = protocol.feed
    count = 0
    now = 0.0  # the receive time of the record being replayed
    for now, node, event in decoded:
        kind = type(event)
        if kind is PushNote:
            note: PushNote = event  # type: ignore[assignment]
            notes.append(note)
            if note.lasts is not None:  # older notes do not say how long their push was kept
                pushed(note.call_id, note.aor, note.device, note.lasts, note.sent)
            continue
        if kind is ClockNote:
            clock: ClockNote = event  # type: ignore[assignment]
            protocol.measured(clock.node, clock.offset, clock.uncertainty, clock.at)
            continue
        count += 1
        if isinstance(event, str):  # why the record is no event
            result.errors[event] += 1
            continue
        by_type[kind] = by_type.get(kind, 0) + 1
        got = feed(node, event, now)  # type: ignore[arg-type]
        if type(got) is Decided and got.decisions:
            out += got.decisions
    out += protocol.tick(now + 86_400)  # let pending decisions settle
    result.records = count
    for kind, n in by_type.items():
        result.events[TYPE_NAMES[kind]] += n
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
