"""Sans-I/O codec for Redis's protocol (RESP2): commands out, replies in.

Like netstring.py, it never touches a socket: :func:`encode_command` makes a
command's bytes, :class:`RespDecoder` is fed what the socket gave and hands
back whole replies. A reply is ``str`` (a status such as ``OK``), ``int``,
``bytes`` or ``None`` (a bulk string, or its absence), a ``list`` of replies
or ``None`` (an array, or its absence), or a :class:`RedisError` (an error
reply: the command failed, the connection is fine).

Bytes that are not RESP raise :class:`RespProtocolError`, and the decoder
takes nothing more: the connection must be made again. Every length is
bounded, so a broken or hostile server cannot make the worker allocate
without limit.
"""

from __future__ import annotations

import enum
from typing import Any, Final, NoReturn, TypeAlias

__all__ = [
    "MAX_ARRAY",
    "MAX_BULK",
    "MAX_DEPTH",
    "NEED_DATA",
    "NeedData",
    "RedisError",
    "Reply",
    "RespDecoder",
    "RespProtocolError",
    "encode_command",
]

# A bulk string or array longer than these is a broken stream, not a reply
# (the worker reads events of at most a few KiB, a thousand at a time).
MAX_BULK: Final = 64 * 1024 * 1024
MAX_ARRAY: Final = 1 << 20
MAX_DEPTH: Final = 8
# Bytes waiting for one reply to be whole; more is a broken stream.
MAX_BUFFER: Final = 256 * 1024 * 1024
# A status, error or number line longer than this has lost its CRLF.
_MAX_LINE: Final = 64 * 1024


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


Reply: TypeAlias = "str | int | bytes | list[Reply] | RedisError | None"


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
    at each read. Arrays being filled wait on a stack.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0  # where parsing goes on in _buf
        self._stack: list[list[Any]] = []  # [items so far, items still to come] of the open arrays
        self._broken = False

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def receive_data(self, data: bytes) -> None:
        if self._broken:
            raise RespProtocolError("decoder already failed; open a new connection")
        self._buf += data
        if len(self._buf) > MAX_BUFFER:
            self._fail(f"a reply of more than {MAX_BUFFER} bytes")

    def _fail(self, why: str) -> NoReturn:
        self._broken = True
        self._buf.clear()
        self._stack.clear()
        raise RespProtocolError(why)

    def next_reply(self) -> Reply | NeedData:
        """The next whole reply, or NEED_DATA."""
        if self._broken:
            raise RespProtocolError("decoder already failed; open a new connection")
        buf, pos, stack = self._buf, self._pos, self._stack
        size = len(buf)
        value: Reply
        while True:
            end = buf.find(b"\r\n", pos)
            if end < 0:
                if size - pos > _MAX_LINE:
                    self._fail(f"a line of more than {_MAX_LINE} bytes")
                self._pos = pos
                return NEED_DATA
            kind = buf[pos]
            if kind == 0x24:  # $ bulk string
                length = self._number(buf, pos, end)
                if length < 0:
                    if length != -1:
                        self._fail(f"bulk length {length} is out of bounds")
                    value, pos = None, end + 2
                else:
                    if length > MAX_BULK:
                        self._fail(f"bulk length {length} is out of bounds")
                    start = end + 2
                    stop = start + length
                    if size < stop + 2:
                        self._pos = pos  # its header is read again with the rest
                        return NEED_DATA
                    if buf[stop : stop + 2] != b"\r\n":
                        self._fail("bulk string not followed by CRLF")
                    value, pos = bytes(buf[start:stop]), stop + 2
            elif kind == 0x2A:  # * array
                count = self._number(buf, pos, end)
                pos = end + 2
                if not -1 <= count <= MAX_ARRAY:
                    self._fail(f"array length {count} is out of bounds")
                if count < 0:
                    value = None
                elif count == 0:
                    value = []
                else:
                    if len(stack) >= MAX_DEPTH:
                        self._fail(f"arrays nested more than {MAX_DEPTH} deep")
                    stack.append([[], count])
                    continue
            elif kind == 0x3A:  # : integer
                value, pos = self._number(buf, pos, end), end + 2
            elif kind == 0x2B:  # + status
                value, pos = buf[pos + 1 : end].decode("utf-8", "replace"), end + 2
            elif kind == 0x2D:  # - error
                value, pos = RedisError(buf[pos + 1 : end].decode("utf-8", "replace")), end + 2
            else:
                self._fail(f"unknown reply type {bytes([kind])!r}")
            # The value completes the arrays it closes, innermost first.
            while stack:
                top = stack[-1]
                top[0].append(value)
                top[1] -= 1
                if top[1]:
                    break
                stack.pop()
                value = top[0]
            else:
                del buf[:pos]
                self._pos = 0
                return value

    def _number(self, buf: bytearray, pos: int, end: int) -> int:
        try:
            return int(buf[pos + 1 : end])
        except ValueError:
            self._fail(f"{bytes(buf[pos + 1 : end][:20])!r} is not a number")
