"""Sans-I/O codec for Redis's protocol (RESP2): commands out, replies in.

Like netstring.py, it never touches a socket: :func:`encode_command` makes a
command's bytes, :class:`RespDecoder` is fed what the socket gave and hands
back whole replies. A reply is ``str`` (a status such as ``OK``), ``int``,
``bytes`` or ``None`` (a bulk string, or its absence), a ``list`` of replies
or ``None`` (an array, or its absence), a :class:`RedisError` (an error
reply: the command failed, the connection is fine), or :class:`Skipped`.

Memory is bounded whatever the server sends. A value longer than the
decoder's ``max_value``, an array of more than :data:`MAX_ARRAY` items, and
whatever would take a reply past ``max_reply`` are not kept: their bytes
are read and dropped as they come, and the reply holds a :class:`Skipped`
in their place. The connection stays in step, so one oversized stream entry
costs that entry only, never the connection (a reader that failed on it
would read it again at each reconnect, for ever).

Bytes that are not RESP raise :class:`RespProtocolError`, and the decoder
takes nothing more: the connection must be made again.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Final, NoReturn, TypeAlias

__all__ = [
    "MAX_ARRAY",
    "MAX_DEPTH",
    "MAX_REPLY",
    "MAX_VALUE",
    "NEED_DATA",
    "NeedData",
    "RedisError",
    "Reply",
    "RespDecoder",
    "RespProtocolError",
    "Skipped",
    "encode_command",
]

# What the worker keeps of one reply: it reads events of at most 64 KiB, a
# thousand at a time.
MAX_VALUE: Final = 1024 * 1024
MAX_REPLY: Final = 128 * 1024 * 1024
MAX_ARRAY: Final = 1 << 20
MAX_DEPTH: Final = 8
# A status, error or number line longer than this has lost its CRLF.
_MAX_LINE: Final = 64 * 1024
# What an item costs besides its bytes (a Python object and its list slot),
# counted against max_reply.
_ITEM_COST: Final = 64


class NeedData(enum.Enum):
    """Sentinel type: the decoder needs more bytes to produce a reply."""

    NEED_DATA = enum.auto()


NEED_DATA: Final = NeedData.NEED_DATA


class RedisError(Exception):
    """An error reply (``-ERR ...``, ``-WRONGTYPE ...``): the command failed."""

    @property
    def code(self) -> str:
        """The error's first word: ERR, WRONGTYPE, NOAUTH, LOADING, READONLY..."""
        return str(self).split(" ", 1)[0]


class RespProtocolError(Exception):
    """The server sent bytes that are not RESP; the stream is out of sync."""


@dataclass(frozen=True, slots=True)
class Skipped:
    """A value read and dropped: ``size`` bytes of a bulk string or items of
    an array. ``too_long``: longer than any reply may keep (it would be
    dropped again); else it came past the reply's budget (alone in a
    smaller reply, it may be kept)."""

    size: int
    too_long: bool


Reply: TypeAlias = "str | int | bytes | list[Reply] | RedisError | Skipped | None"


def encode_command(*args: bytes | str | int | float) -> bytes:
    """One command as RESP's array of bulk strings (any bytes may be in them)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(parts)


class RespDecoder:
    """Turns the bytes a Redis server sends into replies.

    Resumable: a reply that arrives in many reads (a thousand stream entries
    are 300 KB) is parsed once, as its bytes come, not again from its start
    at each read. Arrays being filled wait on a stack; bytes already parsed
    are let go at each read, so the buffer holds at most one value and one
    read.
    """

    def __init__(self, *, max_value: int = MAX_VALUE, max_reply: int = MAX_REPLY) -> None:
        self.max_value = max_value
        self.max_reply = max_reply
        self._buf = bytearray()
        self._pos = 0  # where parsing goes on in _buf
        # The open arrays: [items so far (None: dropped), items still to come, size].
        self._stack: list[list[Any]] = []
        self._room = max_reply  # bytes (and item costs) the reply being read may still keep
        self._drop = 0  # bytes still to come of a value being dropped (with its CRLF)
        self._broken = False

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def receive_data(self, data: bytes) -> None:
        if self._broken:
            raise RespProtocolError("decoder already failed; open a new connection")
        if self._drop:
            dropped = min(self._drop, len(data))
            self._drop -= dropped
            data = data[dropped:]
        self._buf += data

    def _fail(self, why: str) -> NoReturn:
        self._broken = True
        self._buf.clear()
        self._stack.clear()
        raise RespProtocolError(why)

    def next_reply(self) -> Reply | NeedData:
        """The next whole reply, or NEED_DATA."""
        if self._broken:
            raise RespProtocolError("decoder already failed; open a new connection")
        if self._drop:
            return NEED_DATA
        buf, pos, stack = self._buf, self._pos, self._stack
        max_value, room = self.max_value, self._room
        size = len(buf)
        value: Reply
        while True:
            end = buf.find(b"\r\n", pos)
            if end < 0:
                if size - pos > _MAX_LINE:
                    self._fail(f"a line of more than {_MAX_LINE} bytes")
                self._room = room
                return self._wait(pos)
            kind = buf[pos]
            if kind == 0x24:  # $ bulk string
                length = self._number(buf, pos, end)
                if length < 0:
                    if length != -1:
                        self._fail(f"bulk length {length} is out of bounds")
                    value, pos = None, end + 2
                else:
                    start = end + 2
                    stop = start + length
                    # Inside an array being dropped, nothing is kept.
                    if length > max_value or length + _ITEM_COST > room or (stack and stack[-1][0] is None):
                        value = Skipped(length, length > max_value)
                        if size < stop + 2:
                            # The rest of it is dropped as it comes.
                            self._drop = stop + 2 - size
                            pos = size
                        else:
                            pos = stop + 2
                    else:
                        if size < stop + 2:
                            self._room = room
                            return self._wait(pos)  # its header is read again with the rest
                        if buf[stop : stop + 2] != b"\r\n":
                            self._fail("bulk string not followed by CRLF")
                        value, pos = bytes(buf[start:stop]), stop + 2
                        room -= length + _ITEM_COST
            elif kind == 0x2A:  # * array
                count = self._number(buf, pos, end)
                pos = end + 2
                if count < -1:
                    self._fail(f"array length {count} is out of bounds")
                if count <= 0:
                    value = None if count < 0 else []
                else:
                    if len(stack) >= MAX_DEPTH:
                        self._fail(f"arrays nested more than {MAX_DEPTH} deep")
                    keep = count <= MAX_ARRAY and count * _ITEM_COST <= room and not (stack and stack[-1][0] is None)
                    stack.append([[] if keep else None, count, count])
                    continue
            elif kind == 0x3A:  # : integer
                value, pos = self._number(buf, pos, end), end + 2
                room -= _ITEM_COST
            elif kind == 0x2B:  # + status
                room -= end - pos + _ITEM_COST
                value, pos = buf[pos + 1 : end].decode("utf-8", "replace"), end + 2
            elif kind == 0x2D:  # - error
                room -= end - pos + _ITEM_COST
                value, pos = RedisError(buf[pos + 1 : end].decode("utf-8", "replace")), end + 2
            else:
                self._fail(f"unknown reply type {bytes([kind])!r}")
            # The value completes the arrays it closes, innermost first.
            while stack:
                top = stack[-1]
                if top[0] is not None:
                    top[0].append(value)
                top[1] -= 1
                if top[1]:
                    break
                stack.pop()
                value = top[0] if top[0] is not None else Skipped(top[2], top[2] > MAX_ARRAY)
            else:
                del buf[:pos]
                self._pos = 0
                self._room = self.max_reply
                return value
            if self._drop:
                self._room = room
                return self._wait(pos)

    def _wait(self, pos: int) -> NeedData:
        # What is parsed is kept in the values already: let its bytes go.
        del self._buf[:pos]
        self._pos = 0
        return NEED_DATA

    def _number(self, buf: bytearray, pos: int, end: int) -> int:
        try:
            return int(buf[pos + 1 : end])
        except ValueError:
            self._fail(f"{bytes(buf[pos + 1 : end][:20])!r} is not a number")
