"""One record log for the journal and the capture: framing that costs a
damaged record only itself, read in any pieces; node clocks kept in both;
replay reads journals as well as captures of every version."""

from __future__ import annotations

from pathlib import Path

from hypothesis import example, given
from hypothesis import strategies as st

from evapi_worker.capture import CaptureSettings, CaptureWriter, ClockNote, PushNote, Record, frames, read_capture
from evapi_worker.core.clocks import NodeClocks
from evapi_worker.core.engine import Engine, EngineSettings
from evapi_worker.core.events import EventError, parse_event
from evapi_worker.core.protocol import Protocol, decisions_of
from evapi_worker.core.records import FrameReader, frame
from evapi_worker.persistence import StateStore
from evapi_worker.replay import decision_json, load_records, replay

from ..helpers import Wire

T0 = 1_700_000_000.0
STORY = Path(__file__).parent.parent / "data" / "story.evcap"

_values = st.lists(
    st.one_of(st.integers(-(2**63), 2**63 - 1), st.text(max_size=8), st.binary(max_size=40), st.floats(allow_nan=False))
)


def _read(data: bytes, cuts: list[int]) -> list[list[object] | None]:
    reader = FrameReader()
    out: list[list[object] | None] = []
    start = 0
    for cut in [*sorted({min(c, len(data)) for c in cuts}), len(data)]:
        reader.feed(data[start:cut])
        out += reader.records()
        start = cut
    return out + list(reader.records(final=True))


@given(records=st.lists(_values, max_size=12), cuts=st.lists(st.integers(0, 2000), max_size=8))
def test_records_read_in_any_pieces_are_the_records_written(records: list[list[object]], cuts: list[int]) -> None:
    data = b"".join(frame(r) for r in records)
    assert _read(data, cuts) == [r for r in records]


@given(
    records=st.lists(_values, min_size=3, max_size=12),
    hit=st.integers(0, 10_000),
    byte=st.integers(0, 255),
    cuts=st.lists(st.integers(0, 2000), max_size=4),
)
# A payload holding the mark's bytes: resynchronising inside the damaged
# record finds a false mark, which is still that record's damage.
@example(records=[[], [], [b"\xe5EVJ"]], hit=26, byte=0, cuts=[])
def test_a_damaged_byte_costs_at_most_the_record_it_is_in(
    records: list[list[object]], hit: int, byte: int, cuts: list[int]
) -> None:
    framed = [frame(r) for r in records]
    data = bytearray(b"".join(framed))
    at = hit % len(data)
    if data[at] == byte:
        return
    data[at] = byte
    got = _read(bytes(data), cuts)
    # Which record the byte was in: every other one is read, in order.
    ends = [sum(len(f) for f in framed[: i + 1]) for i in range(len(framed))]
    damaged = next(i for i, end in enumerate(ends) if at < end)
    others = [r for i, r in enumerate(records) if i != damaged]
    assert [r for r in got if r is not None] == others or [r for r in got if r is not None] == records
    assert got.count(None) <= 1


def test_a_torn_last_record_is_one_gap() -> None:
    data = frame(["a", 1]) + frame(["b", 2])[:-3]
    assert _read(data, [5, 17]) == [["a", 1], None]


async def test_a_capture_with_a_bad_byte_in_the_middle_loses_only_the_record_it_is_in(tmp_path: Path) -> None:
    settings = CaptureSettings(tmp_path / "cap")
    writer = CaptureWriter(settings)
    settings.folder.mkdir()
    writer._write([("kam1", n, T0 + n, b'{"event":"x","n":%d}' % n) for n in range(1000)])
    writer._close()
    (path,) = settings.folder.iterdir()
    data = bytearray(path.read_bytes())
    middle = data.index(b'"n":600}')
    data[middle + 4] ^= 0xFF  # one byte of frame 600's payload
    path.write_bytes(bytes(data))
    problems: list[str] = []
    seqs = [r.seq for r in frames(read_capture(path, problems))]
    # Frames are recorded 256 a record: 512..767 are lost, and only they.
    assert seqs == [n for n in range(1000) if not 512 <= n < 768]
    assert len(problems) == 1 and "damaged" in problems[0]


async def test_a_capture_keeps_pushes_and_node_clocks_in_order_with_the_frames(tmp_path: Path) -> None:
    settings = CaptureSettings(tmp_path / "cap")
    writer = CaptureWriter(settings)
    settings.folder.mkdir()
    items: list[tuple[str, int | None, float, bytes] | PushNote | ClockNote] = [
        ("kam1", 1, T0, b"{}"),
        ClockNote(T0 + 0.5, "kam1", 2.25, 0.001),
        PushNote(T0 + 0.6, "c1", "urn:uuid:d", "apns", "bob@x", 30.0),
        ("kam1", 2, T0 + 1, b"{}"),
    ]
    writer._write(items)
    writer._close()
    (path,) = settings.folder.iterdir()
    assert list(read_capture(path)) == [Record("kam1", 1, T0, b"{}"), *items[1:3], Record("kam1", 2, T0 + 1, b"{}")]


def test_an_older_capture_is_still_read() -> None:
    # story.evcap is a capture of format 2 (msgpack records back to back).
    assert STORY.read_bytes()[:1] != b"e"
    assert len(list(frames(read_capture(STORY)))) > 10


def test_a_journal_restores_the_node_clocks_measured_between_its_events(tmp_path: Path) -> None:
    """A REGISTER journaled after a ping measured its node's clock is
    placed with that clock after a restart, not with the wall clock."""
    wire = Wire()
    wall = T0 - 100.0  # engine time 100 is T0
    store = StateStore(tmp_path / "state", wall, lambda *_: None)
    clocks = NodeClocks(wall)
    proto = Protocol(Engine(EngineSettings()), clocks)
    store.restore(proto.engine, 100.0, lambda *_: [], None, clocks)
    start = wire.raw("call_start", T0 + 3, call_id="c1", aor="bob@example.com", from_user="alice")
    proto.receive("kam1", start, 100.0)
    store.note_event("kam1", 100.0, start)
    # The node runs 3 s ahead of the wall clock.
    measured = proto.ping("kam1", 100.5, 100.52, T0 + 0.51 + 3)
    assert measured is not None
    store.note_clock("kam1", measured.offset, measured.uncertainty, measured.at)
    cancel = wire.raw("call_cancelled", T0 + 4, call_id="c1", aor="bob@example.com")
    proto.receive("kam1", cancel, 101.0)
    store.note_event("kam1", 101.0, cancel)
    register = wire.register_raw(T0 + 5.5)
    (live,) = decisions_of(proto.receive("kam1", register, 104.0))
    store.note_event("kam1", 104.0, register)
    store.close()

    # Restarted 50 s later, on a new engine clock (its zero is T0 + 50).
    clocks2 = NodeClocks(T0 + 50)
    proto2 = Protocol(Engine(EngineSettings()), clocks2)
    decided: list[object] = []
    store2 = StateStore(tmp_path / "state", T0 + 50, lambda *_: None)

    def again(node: str, payload: bytes, now: float) -> list[object]:
        got = decisions_of(proto2.restore(node, payload, now))
        decided.extend(got)
        return list(got)

    store2.restore(proto2.engine, 0.0, again, None, clocks2)  # type: ignore[arg-type]
    (restored,) = decided
    assert abs(clocks2.offset("kam1") - (3.0 + T0 + 50)) < 0.02
    # The REGISTER happened at T0 + 2.5 (its stamp minus 3 s): the same
    # instant on both clocks.
    assert abs((live.deadline + wall) - (restored.deadline + T0 + 50)) < 1e-6  # type: ignore[attr-defined]

    # A replay of the journal places it the same way (its clock: the wall clock).
    (replayed,) = replay(load_records(sorted(tmp_path.glob("state.journal.*")), []), EngineSettings()).decisions
    assert abs(replayed.deadline - (live.deadline + wall)) < 1e-6  # type: ignore[attr-defined]


def test_replay_reads_a_journal_as_it_reads_a_capture(tmp_path: Path) -> None:
    story = list(frames(read_capture(STORY)))
    from_capture = replay(story, EngineSettings()).decisions
    wall = story[0].received - 10.0
    store = StateStore(tmp_path / "state", wall, lambda *_: None)
    engine = Engine()
    store.restore(engine, 0.0, lambda *_: [])
    for node, _seq, received, payload in story:
        try:
            parse_event(payload)
        except EventError:
            continue  # the journal holds the events the engine took
        store.note_event(node, received - wall, payload)
    store.close()
    journals = sorted(tmp_path.glob("state.journal.*"))
    from_journal = replay(load_records(journals, []), EngineSettings()).decisions
    assert [decision_json(d) for d in from_journal] == [decision_json(d) for d in from_capture]
