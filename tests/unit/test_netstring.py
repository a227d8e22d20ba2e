"""The netstring codec, fed whole, byte by byte, and in arbitrary splits."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from evapi_worker.core.netstring import NEED_DATA, FramingError, NetstringDecoder, OversizedFrame, encode


def drain(decoder: NetstringDecoder) -> list[bytes | OversizedFrame]:
    out: list[bytes | OversizedFrame] = []
    while (frame := decoder.next_frame()) is not NEED_DATA:
        assert not isinstance(frame, type(NEED_DATA))
        out.append(frame)
    return out


def feed(decoder: NetstringDecoder, chunks: list[bytes]) -> list[bytes | OversizedFrame]:
    out: list[bytes | OversizedFrame] = []
    for chunk in chunks:
        decoder.receive_data(chunk)
        out += drain(decoder)
    return out


def test_encode_matches_evapi_format() -> None:
    assert encode(b'{"a":1}') == b'7:{"a":1},'
    assert encode(b"") == b"0:,"


def test_whole_input_many_frames_in_one_read() -> None:
    d = NetstringDecoder()
    assert feed(d, [b"3:abc,0:,5:hello,"]) == [b"abc", b"", b"hello"]
    assert d.buffered == 0


def test_one_byte_at_a_time() -> None:
    data = encode(b"first") + encode(b"second")
    d = NetstringDecoder()
    assert feed(d, [bytes([b]) for b in data]) == [b"first", b"second"]


def test_trailing_partial_frame_waits() -> None:
    d = NetstringDecoder()
    assert feed(d, [b"3:abc,4:ab"]) == [b"abc"]
    assert d.in_frame
    assert feed(d, [b"cd,"]) == [b"abcd"]
    assert not d.in_frame


def test_payload_may_contain_commas_and_colons() -> None:
    d = NetstringDecoder()
    assert feed(d, [encode(b"1:a,,:")]) == [b"1:a,,:"]


def test_oversized_frame_is_skipped_without_buffering_and_stream_stays_in_sync() -> None:
    d = NetstringDecoder(max_frame=4)
    big = b"x" * 1000
    out = feed(d, [b"1000:", big[:500]])
    assert out == []
    assert d.buffered == 0  # nothing of the big payload is kept
    out = feed(d, [big[500:] + b",2:ok,"])
    assert out == [OversizedFrame(1000), b"ok"]


def test_frame_exactly_at_the_limit_is_accepted() -> None:
    d = NetstringDecoder(max_frame=4)
    assert feed(d, [b"4:abcd,"]) == [b"abcd"]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"abc:xyz,", "bad_length"),
        (b"3x:abc,", "bad_length"),
        (b":abc,", "bad_length"),
        (b"03:abc,", "bad_length"),
        (b"12345678901:", "bad_length"),
        (b"3:abcX", "missing_comma"),
        (b"-1:,", "bad_length"),
        (b"\x00\xff\x13", "bad_length"),
    ],
)
def test_broken_framing_raises_a_typed_error(data: bytes, reason: str) -> None:
    d = NetstringDecoder()
    with pytest.raises(FramingError) as info:
        feed(d, [data])
    assert info.value.reason == reason


def test_decoder_refuses_input_after_an_error() -> None:
    d = NetstringDecoder()
    with pytest.raises(FramingError):
        feed(d, [b"x:"])
    with pytest.raises(FramingError, match="broken"):
        d.receive_data(b"3:abc,")


def test_oversized_frame_without_comma_is_an_error() -> None:
    d = NetstringDecoder(max_frame=2)
    with pytest.raises(FramingError, match="missing_comma"):
        feed(d, [b"3:abcX"])


payloads = st.lists(st.binary(max_size=200), max_size=20)


@given(payloads, st.data())
def test_round_trip_under_any_split(frames: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(encode(f) for f in frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=30)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    d = NetstringDecoder()
    assert feed(d, chunks) == frames
    assert not d.in_frame


@given(payloads, st.integers(0, 50), st.data())
def test_oversized_frames_are_reported_in_place_under_any_split(
    frames: list[bytes], limit: int, data: st.DataObject
) -> None:
    stream = b"".join(encode(f) for f in frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    expected = [f if len(f) <= limit else OversizedFrame(len(f)) for f in frames]
    assert feed(NetstringDecoder(max_frame=limit), chunks) == expected


@given(st.binary(max_size=300))
def test_garbage_never_raises_anything_but_framing_error(garbage: bytes) -> None:
    d = NetstringDecoder(max_frame=100)
    with contextlib.suppress(FramingError):
        feed(d, [garbage])
