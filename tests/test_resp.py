"""Redis's protocol (RESP2), sans I/O: replies whole in any split, bounds kept."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from evapi_worker.resp import (
    MAX_DEPTH,
    NEED_DATA,
    RedisError,
    Reply,
    RespDecoder,
    RespProtocolError,
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
        b"$999999999999\r\n",  # past the bound
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
