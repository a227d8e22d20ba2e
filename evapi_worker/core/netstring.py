"""Sans-I/O netstring codec for the evapi socket.

Kamailio's evapi module frames every message as ``LEN:PAYLOAD,`` where LEN is
the payload's byte length in decimal. This module only turns bytes into frames
and frames into bytes; it never touches a socket, so it is tested by feeding
it bytes in any split.

Usage::

    decoder = NetstringDecoder(max_frame=65536)
    decoder.receive_data(chunk)
    while True:
        frame = decoder.next_frame()
        if frame is NEED_DATA:
            break
        if isinstance(frame, OversizedFrame):
            ...  # counted and skipped; the stream stays in sync
            continue
        handle(frame)

An oversized frame is skipped without being buffered, so the connection stays
usable. A broken length or a missing trailing comma means the byte stream has
lost its framing; :class:`FramingError` is raised and the decoder refuses
further input: the only safe recovery is a new connection.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

__all__ = [
    "DEFAULT_MAX_FRAME",
    "NEED_DATA",
    "FramingError",
    "FramingFault",
    "NeedData",
    "NetstringDecoder",
    "OversizedFrame",
    "encode",
]

DEFAULT_MAX_FRAME: Final = 64 * 1024
# Ten digits already say 9.3 GiB; a longer length is garbage, not a frame.
_MAX_LENGTH_DIGITS: Final = 10


class NeedData(enum.Enum):
    """Sentinel type: the decoder needs more bytes to produce a frame."""

    NEED_DATA = enum.auto()


NEED_DATA: Final = NeedData.NEED_DATA


@dataclass(frozen=True, slots=True)
class OversizedFrame:
    """A well-framed payload longer than the decoder's limit; it was skipped."""

    length: int


class FramingFault(enum.StrEnum):
    """What was wrong with the bytes (a metric label)."""

    BAD_LENGTH = "bad_length"  # the length is not a decimal number
    MISSING_COMMA = "missing_comma"  # no ',' where the payload ends
    OVERSIZED = "oversized"  # well framed, longer than the limit: skipped
    BROKEN = "broken"  # the decoder failed before: it takes nothing more


class FramingError(Exception):
    """The peer sent bytes that are not a netstring; the stream is out of sync.

    ``reason`` says what was wrong, for metrics and logs.
    """

    def __init__(self, reason: FramingFault, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def encode(payload: bytes) -> bytes:
    """Frame ``payload`` as one netstring (to be sent in one write)."""
    return b"%d:%b," % (len(payload), payload)


class _State(enum.Enum):
    LENGTH = enum.auto()  # reading the decimal length up to ':'
    PAYLOAD = enum.auto()  # waiting for payload bytes and the ','
    SKIPPING = enum.auto()  # discarding an oversized payload and its ','
    BROKEN = enum.auto()  # a FramingError was raised; no more input


class NetstringDecoder:
    """Incremental netstring decoder with a maximum frame size."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        if max_frame < 0:
            raise ValueError("max_frame must not be negative")
        self.max_frame = max_frame
        self._buf = bytearray()
        self._state = _State.LENGTH
        self._length = 0
        self._skip_left = 0

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as frames."""
        return len(self._buf)

    @property
    def in_frame(self) -> bool:
        """True while a frame has started but not ended (for EOF diagnostics)."""
        return bool(self._buf) or self._state in (_State.PAYLOAD, _State.SKIPPING)

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the peer; frames come out of :meth:`next_frame`."""
        if self._state is _State.BROKEN:
            raise FramingError(FramingFault.BROKEN, "decoder already failed; open a new connection")
        self._buf += data

    def next_frame(self) -> bytes | OversizedFrame | NeedData:
        """Return the next complete payload, an :class:`OversizedFrame`, or NEED_DATA."""
        buf = self._buf
        if self._state is _State.LENGTH:
            # Fast path: a whole, well-formed frame is buffered (the usual
            # case, with many frames per read). Anything else goes the long way.
            colon = buf.find(b":", 0, _MAX_LENGTH_DIGITS + 1)
            if colon > 0 and (colon == 1 or buf[0] != 0x30):
                digits = buf[:colon]
                if digits.isdigit():
                    length = int(digits)
                    end = colon + 1 + length
                    if length <= self.max_frame and len(buf) > end and buf[end] == 0x2C:
                        payload = bytes(buf[colon + 1 : end])
                        del buf[: end + 1]
                        return payload
        while True:
            if self._state is _State.LENGTH:
                colon = self._buf.find(b":", 0, _MAX_LENGTH_DIGITS + 1)
                if colon < 0:
                    if len(self._buf) > _MAX_LENGTH_DIGITS:
                        self._fail(FramingFault.BAD_LENGTH, f"no ':' after {_MAX_LENGTH_DIGITS} bytes")
                    self._check_digits(self._buf)
                    return NEED_DATA
                digits = self._buf[:colon]
                self._check_digits(digits)
                if not digits:
                    self._fail(FramingFault.BAD_LENGTH, "empty length")
                if len(digits) > 1 and digits[0:1] == b"0":
                    self._fail(FramingFault.BAD_LENGTH, "leading zero in length")
                self._length = int(digits)
                del self._buf[: colon + 1]
                if self._length > self.max_frame:
                    self._state = _State.SKIPPING
                    self._skip_left = self._length + 1  # payload and trailing ','
                    continue
                self._state = _State.PAYLOAD
            if self._state is _State.PAYLOAD:
                if len(self._buf) < self._length + 1:
                    return NEED_DATA
                if self._buf[self._length] != ord(","):
                    self._fail(FramingFault.MISSING_COMMA, f"byte {self._buf[self._length]!r} after payload")
                payload = bytes(self._buf[: self._length])
                del self._buf[: self._length + 1]
                self._state = _State.LENGTH
                return payload
            if self._state is _State.SKIPPING:
                take = min(self._skip_left, len(self._buf))
                if take == self._skip_left and take > 0 and self._buf[take - 1] != ord(","):
                    self._fail(FramingFault.MISSING_COMMA, "oversized frame not followed by ','")
                del self._buf[:take]
                self._skip_left -= take
                if self._skip_left:
                    return NEED_DATA
                self._state = _State.LENGTH
                return OversizedFrame(self._length)
            raise FramingError(FramingFault.BROKEN, "decoder already failed; open a new connection")

    def _check_digits(self, digits: bytes | bytearray) -> None:
        if digits and not digits.isdigit():
            self._fail(FramingFault.BAD_LENGTH, f"non-digit in length {bytes(digits[:12])!r}")

    def _fail(self, reason: FramingFault, detail: str) -> None:
        self._state = _State.BROKEN
        self._buf.clear()
        raise FramingError(reason, detail)
