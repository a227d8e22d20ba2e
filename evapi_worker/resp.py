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
from typing import Final, TypeAlias

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


class _Incomplete(Exception):
    """Not all of the reply is here yet; ``need``: bytes the buffer must reach."""

    def __init__(self, need: int) -> None:
        self.need = need


class RespDecoder:
    """Turns the bytes a Redis server sends into replies."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._need = 0  # the buffer's size before a parse can finish
        self._broken = False

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def receive_data(self, data: bytes) -> None:
        if self._broken:
            raise RespProtocolError("decoder already failed; open a new connection")
        self._buf += data

    def next_reply(self) -> Reply | NeedData:
        """The next whole reply, or NEED_DATA."""
        if self._broken:
            raise RespProtocolError("decoder already failed; open a new connection")
        if not self._buf or len(self._buf) < self._need:
            return NEED_DATA
        try:
            reply, end = self._parse(0, 0)
        except _Incomplete as missing:
            # A large reply arrives in many reads: not parsed again from its
            # start until the bytes it is known to need are here.
            self._need = missing.need
            return NEED_DATA
        except RespProtocolError:
            self._broken = True
            self._buf.clear()
            raise
        del self._buf[:end]
        self._need = 0
        return reply

    def _line(self, pos: int) -> tuple[bytes, int]:
        buf = self._buf
        end = buf.find(b"\r\n", pos)
        if end < 0:
            if len(buf) - pos > _MAX_LINE:
                raise RespProtocolError(f"a line of more than {_MAX_LINE} bytes")
            raise _Incomplete(len(buf) + 1)
        return bytes(buf[pos:end]), end + 2

    def _length(self, text: bytes, limit: int, what: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise RespProtocolError(f"{what} length {text[:20]!r} is not a number") from None
        if not -1 <= value <= limit:
            raise RespProtocolError(f"{what} length {value} is out of bounds")
        return value

    def _parse(self, pos: int, depth: int) -> tuple[Reply, int]:
        buf = self._buf
        if pos >= len(buf):
            raise _Incomplete(pos + 1)
        kind = buf[pos]
        line, after = self._line(pos + 1)
        if kind == 0x2B:  # + status
            return line.decode("utf-8", "replace"), after
        if kind == 0x2D:  # - error
            return RedisError(line.decode("utf-8", "replace")), after
        if kind == 0x3A:  # : integer
            try:
                return int(line), after
            except ValueError:
                raise RespProtocolError(f"integer {line[:20]!r} is not a number") from None
        if kind == 0x24:  # $ bulk string
            length = self._length(line, MAX_BULK, "bulk")
            if length < 0:
                return None, after
            end = after + length
            if len(buf) < end + 2:
                raise _Incomplete(end + 2)
            if buf[end : end + 2] != b"\r\n":
                raise RespProtocolError("bulk string not followed by CRLF")
            return bytes(buf[after:end]), end + 2
        if kind == 0x2A:  # * array
            count = self._length(line, MAX_ARRAY, "array")
            if count < 0:
                return None, after
            if depth >= MAX_DEPTH:
                raise RespProtocolError(f"arrays nested more than {MAX_DEPTH} deep")
            items: list[Reply] = []
            for _ in range(count):
                item, after = self._parse(after, depth + 1)
                items.append(item)
            return items, after
        raise RespProtocolError(f"unknown reply type {bytes([kind])!r}")
