"""Redis's protocol (RESP2), sans I/O: replies whole in any split, bounds kept."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from evapi_worker.core.resp import (
    MAX_ARRAY,
    MAX_DEPTH,
    NEED_DATA,
    RedisError,
    Reply,
    RespDecoder,
    RespProtocolError,
    Skipped,
    encode_command,
)

# An XREAD reply: [[stream, [[id, [field, value]]]]]
XREAD = (
    b"*1\r\n*2\r\n$11\r\nevw:ev:kam1\r\n*2\r\n"
    b'*2\r\n$15\r\n1700000000000-0\r\n*2\r\n$1\r\ne\r\n$13\r\n{"event":"x"}\r\n'
    b"*2\r\n$15\r\n1700000000000-1\r\n*2\r\n$1\r\ne\r\n$0\r\n\r\n"
)
XREAD_VALUE: Reply = [
    [
        b"evw:ev:kam1",
        [
            [b"1700000000000-0", [b"e", b'{"event":"x"}']],
            [b"1700000000000-1", [b"e", b""]],
        ],
    ]
]


def replies(data: bytes, cuts: list[int]) -> list[Reply]:
    decoder, out = RespDecoder(), []
    start = 0
    for cut in [*sorted(cuts), len(data)]:
        decoder.receive_data(data[start:cut])
        start = cut
        while (reply := decoder.next_reply()) is not NEED_DATA:
            out.append(reply)
    assert decoder.buffered == 0
    return out


def test_encode_command_is_an_array_of_bulk_strings_safe_for_any_bytes() -> None:
    assert encode_command("SET", "k", b"a b\r\n", 7) == b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\na b\r\n\r\n$1\r\n7\r\n"


def test_every_kind_of_reply() -> None:
    data = b"+OK\r\n-WRONGTYPE not a stream\r\n:42\r\n$-1\r\n*-1\r\n*0\r\n" + XREAD
    got = replies(data, [])
    assert got[0] == "OK" and got[2:6] == [42, None, None, []] and got[6] == XREAD_VALUE
    assert isinstance(got[1], RedisError) and got[1].code == "WRONGTYPE"


@given(st.lists(st.integers(min_value=0, max_value=len(XREAD)), max_size=12))
def test_a_reply_split_anywhere_comes_out_whole(cuts: list[int]) -> None:
    assert replies(XREAD + b":1\r\n", cuts) == [XREAD_VALUE, 1]


def test_a_large_reply_in_many_reads_is_not_parsed_again_until_its_bytes_are_here() -> None:
    value = b"x" * 1_000_000
    data = b"$%d\r\n%b\r\n" % (len(value), value)
    decoder = RespDecoder()
    decoder.receive_data(data[:10])
    assert decoder.next_reply() is NEED_DATA
    for i in range(10, len(data), 4096):
        decoder.receive_data(data[i : i + 4096])
        reply = decoder.next_reply()
        if i + 4096 < len(data):
            assert reply is NEED_DATA
    assert reply == value


@pytest.mark.parametrize(
    "data",
    [
        b"?what\r\n",  # no such type
        b"$abc\r\n",  # a length that is no number
        b"*-7\r\n",
        b"$3\r\nabcXY",  # no CRLF after the bulk string
        b":12x\r\n",
        b"*1\r\n" * (MAX_DEPTH + 1) + b":1\r\n",  # nested past the bound
        b"+" + b"a" * 70_000,  # a line that lost its CRLF
    ],
)
def test_bytes_that_are_not_resp_break_the_decoder_for_good(data: bytes) -> None:
    decoder = RespDecoder()
    decoder.receive_data(data)
    with pytest.raises(RespProtocolError):
        decoder.next_reply()
    with pytest.raises(RespProtocolError):
        decoder.receive_data(b"+OK\r\n")


def entry(entry_id: bytes, value: bytes) -> bytes:
    return b"*2\r\n$%d\r\n%b\r\n*2\r\n$1\r\ne\r\n$%d\r\n%b\r\n" % (len(entry_id), entry_id, len(value), value)


def test_a_value_longer_than_the_bound_is_dropped_as_it_comes_and_the_replies_after_it_are_whole() -> None:
    # A 64 MiB stream entry between two small ones, fed a read at a time: it
    # is never held, the entries around it come out, and so does the next reply.
    big = 64 * 1024 * 1024 + 16
    head = b"*3\r\n" + entry(b"1-0", b"a") + b"*2\r\n$3\r\n2-0\r\n*2\r\n$1\r\ne\r\n$%d\r\n" % big
    tail = b"\r\n" + entry(b"3-0", b"c") + b"+OK\r\n"
    decoder = RespDecoder(max_value=1024)
    out: list[Reply] = []
    chunk = b"x" * 65536
    biggest = 0
    for data in [head, *([chunk] * (big // len(chunk))), b"x" * (big % len(chunk)), tail]:
        decoder.receive_data(data)
        biggest = max(biggest, decoder.buffered)
        while (reply := decoder.next_reply()) is not NEED_DATA:
            out.append(reply)
    assert out == [[[b"1-0", [b"e", b"a"]], [b"2-0", [b"e", Skipped(big, True)]], [b"3-0", [b"e", b"c"]]], "OK"]
    assert biggest <= 2 * len(chunk)


def test_a_value_whole_in_one_read_is_dropped_too() -> None:
    assert replies(b"*2\r\n$5\r\nhello\r\n:7\r\n", []) == [[b"hello", 7]]
    decoder = RespDecoder(max_value=4)
    decoder.receive_data(b"*2\r\n$5\r\nhello\r\n:7\r\n")
    assert decoder.next_reply() == [Skipped(5, True), 7]


def test_what_comes_past_the_replys_budget_is_dropped_but_not_as_too_long() -> None:
    data = b"*3\r\n" + entry(b"1-0", b"a" * 500) + entry(b"2-0", b"b" * 500) + entry(b"3-0", b"c") + b":1\r\n"
    decoder = RespDecoder(max_value=1000, max_reply=1200)
    decoder.receive_data(data)
    first = decoder.next_reply()
    assert isinstance(first, list) and first[0] == [b"1-0", [b"e", b"a" * 500]]
    assert first[1] == [b"2-0", [b"e", Skipped(500, False)]]
    # The budget is the reply's: the next reply has its own.
    assert decoder.next_reply() == 1


def test_an_array_past_the_bound_is_read_through_and_dropped() -> None:
    count = MAX_ARRAY + 1
    data = b"*2\r\n*%d\r\n" % count + b":1\r\n" * count + b"$2\r\nok\r\n"
    decoder = RespDecoder()
    decoder.receive_data(data)
    assert decoder.next_reply() == [Skipped(count, True), b"ok"]


@given(st.lists(st.integers(min_value=0, max_value=len(XREAD) + 4), max_size=12), st.integers(0, 20))
def test_dropping_is_the_same_in_any_split(cuts: list[int], bound: int) -> None:
    data = XREAD + b":1\r\n"

    def decode(pieces: list[bytes]) -> list[Reply]:
        decoder, out = RespDecoder(max_value=bound), []
        for piece in pieces:
            decoder.receive_data(piece)
            while (reply := decoder.next_reply()) is not NEED_DATA:
                out.append(reply)
        return out

    edges = [0, *sorted(cuts), len(data)]
    assert decode([data[a:b] for a, b in itertools.pairwise(edges)]) == decode([data])
