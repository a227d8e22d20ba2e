"""The record log's encoding, shared by the journal and the capture.

A log file starts with a magic line naming what it is and its version;
then come records, each a msgpack array framed by a mark, the payload's
length and its CRC-32 (big-endian u32 each). A damaged or torn record
costs only itself: reading resynchronises at the next mark.

The records' first item says what each is. Both logs use the same kinds
where they mean the same thing, times on the file's clock (``w``: the
wall clock minus that clock; a capture's clock is the wall clock)::

    ["w", wall minus file clock]                          the file's clock
    ["c", time, node, node minus wall, uncertainty]       a node's clock measured
    ["u", time, call_id, aor, device, seconds, provider?]  a push accepted
    ["e", [[node, time, payload], ...]]                   events the engine took (journal)
    ["f", [[node, seq or None, time, payload], ...]]       frames read, in batches (capture)
    ["a", call_id, device, aor]                           an action begins (journal)
    ["p", {node: entry id}]                               Redis stream positions (journal)

Sans-I/O: :func:`frame` makes bytes, :class:`FrameReader` takes bytes as
they are read and hands back whole records.
"""

from __future__ import annotations

import math
import struct
import zlib
from typing import Final, NamedTuple, TypeGuard

import msgspec

__all__ = [
    "ACTION",
    "CAPTURE_MAGIC",
    "CLOCK",
    "EVENTS",
    "FILE_CLOCK",
    "FRAME",
    "JOURNAL_MAGIC",
    "MAGICS",
    "MARK",
    "MAX_RECORD",
    "POSITIONS",
    "PUSHED",
    "ClockRecord",
    "FrameReader",
    "PushedRecord",
    "clock_record",
    "event_item",
    "finite_number",
    "frame",
    "pushed_record",
]

JOURNAL_MAGIC: Final = b"evapi-worker journal 2\n"
CAPTURE_MAGIC: Final = b"evapi-worker capture 3\n"
MAGICS: Final = (JOURNAL_MAGIC, CAPTURE_MAGIC)

FILE_CLOCK: Final = "w"
CLOCK: Final = "c"
PUSHED: Final = "u"
EVENTS: Final = "e"
FRAME: Final = "f"
ACTION: Final = "a"
POSITIONS: Final = "p"

MARK: Final = b"\xe5EVJ"
_HEAD: Final = struct.Struct(">4sII")
MAX_RECORD: Final = 1 << 28

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode


def frame(record: list[object]) -> bytes:
    """One record, framed."""
    payload = _encode(record)
    return _HEAD.pack(MARK, len(payload), zlib.crc32(payload)) + payload


class FrameReader:
    """Records from a log's bytes (after its magic line), fed in pieces of
    any size. Each damaged stretch (what lies between two sound records and
    is none: bytes that are no record, a bad CRC, a record that is not an
    array) is one ``None``, and reading goes on at the next mark."""

    def __init__(self, max_record: int = MAX_RECORD) -> None:
        self._buffer = bytearray()
        self._max = max_record
        # In a damaged stretch already reported: until a whole record is
        # read again, since a payload may hold the mark's bytes and a false
        # mark in a damaged record is still that record's damage.
        self._skipping = False

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def records(self, final: bool = False) -> list[list[object] | None]:
        """The whole records fed so far; ``final``: no more bytes come, so
        what is left is a torn record (one ``None``)."""
        buffer = self._buffer
        out: list[list[object] | None] = []
        add = out.append
        pos = 0
        size = _HEAD.size
        unpack = _HEAD.unpack_from
        crc32 = zlib.crc32
        limit = self._max
        view = memoryview(buffer)
        try:
            while True:
                if len(buffer) - pos < size:
                    if final and pos < len(buffer) and not self._skipping:
                        add(None)  # a torn head
                    break
                mark, length, crc = unpack(buffer, pos)
                end = pos + size + length
                if mark == MARK and length <= limit and end <= len(buffer):
                    with view[pos + size : end] as payload:  # no copy; released before the buffer shrinks
                        value = None
                        if crc32(payload) == crc:
                            try:
                                value = _decode(payload)
                            except (msgspec.DecodeError, RecursionError):
                                value = None
                    if type(value) is list:
                        add(value)
                        pos = end
                        self._skipping = False
                        continue
                elif mark == MARK and length <= limit and not final:
                    break  # not all here yet
                # Damaged here (or, at the end, a torn record, a damaged length).
                if not self._skipping:
                    add(None)
                self._skipping = True
                pos = _next_mark(buffer, pos)
        finally:
            view.release()
        if final:
            pos = len(buffer)
            self._skipping = False
        del buffer[:pos]
        return out


def _next_mark(buffer: bytearray, pos: int) -> int:
    """Where the next mark after ``pos`` is; with none in the buffer, where
    one may yet start (its first bytes kept for the next feed)."""
    found = buffer.find(MARK, pos + 1)
    return found if found >= 0 else max(pos + 1, len(buffer) - len(MARK) + 1)


# -- reading the records both logs share ----------------------------------
#
# What is read is checked before anyone uses it: these give a record's
# values, times still on the file's clock, or None when it is no such record.


def finite_number(value: object) -> TypeGuard[float]:
    """Whether a value read from a file is a number that can be a time or
    a length: an int or a float, not a bool, not inf or nan."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class PushedRecord(NamedTuple):
    at: float  # on the file's clock
    call_id: str
    aor: str
    device: str
    lasts: float | None  # seconds the provider may keep it (None: not said)
    provider: str  # "" in a journal's records


def pushed_record(record: list[object]) -> PushedRecord | None:
    """``["u", time, call_id, aor, device, seconds, provider?]``."""
    if len(record) not in (6, 7) or not finite_number(record[1]):
        return None
    call_id, aor, device, lasts = record[2], record[3], record[4], record[5]
    provider = record[6] if len(record) == 7 else ""
    if not (isinstance(call_id, str) and isinstance(aor, str) and isinstance(device, str)):
        return None
    if not isinstance(provider, str):
        return None
    if lasts is not None and not (finite_number(lasts) and 0 <= lasts <= 3600):
        return None
    return PushedRecord(float(record[1]), call_id, aor, device, None if lasts is None else float(lasts), provider)


class ClockRecord(NamedTuple):
    at: float  # on the file's clock
    node: str
    offset: float  # the node's clock minus the wall clock
    uncertainty: float


def clock_record(record: list[object]) -> ClockRecord | None:
    """``["c", time, node, node's clock minus wall, uncertainty]``."""
    if len(record) != 5 or not isinstance(record[2], str):
        return None
    at, offset, uncertainty = record[1], record[3], record[4]
    if not (finite_number(at) and finite_number(offset) and finite_number(uncertainty)):
        return None
    return ClockRecord(float(at), record[2], float(offset), float(uncertainty))


def event_item(item: object) -> tuple[str, float, bytes] | None:
    """One event of an ``["e", [...]]`` batch: (node, time, payload)."""
    if (
        isinstance(item, list)
        and len(item) == 3
        and isinstance(item[0], str)
        and finite_number(item[1])
        and isinstance(item[2], bytes)
    ):
        return item[0], float(item[1]), item[2]
    return None
