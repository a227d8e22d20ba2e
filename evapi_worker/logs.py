"""Structured log lines: ``key=value`` pairs (logfmt), one line per record.

Values come from the network, so :func:`kv` quotes and escapes them: a CR or
LF in a User-Agent can never forge a second log line.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Final

__all__ = ["LogfmtFormatter", "kv", "setup_logging"]

_BARE_OK: Final = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:/@+%*~()[]<>,;!?")


def _value(value: object) -> str:
    if value is None:
        return '""'
    if isinstance(value, float):
        text = f"{value:.6f}".rstrip("0").rstrip(".")
        return text or "0"
    text = str(value)
    if text and all(ch in _BARE_OK for ch in text):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    escaped = "".join(ch if ch >= " " and ch != "\x7f" else f"\\x{ord(ch):02x}" for ch in escaped)
    return f'"{escaped}"'


def kv(**fields: object) -> str:
    """``a=1 b="two words"`` with every value escaped."""
    return " ".join(f"{key}={_value(value)}" for key, value in fields.items())


class LogfmtFormatter(logging.Formatter):
    """``ts=... level=... logger=... <message>``; messages are written as key=value."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        millis = int(record.msecs)
        line = f"ts={stamp}.{millis:03d}Z level={record.levelname.lower()} logger={record.name} {record.getMessage()}"
        if record.exc_info:
            line += " exc=" + _value(self.formatException(record.exc_info))
        return line


def setup_logging(level: str = "info") -> None:
    """Send the worker's logs to stderr as logfmt lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger("evapi_worker")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
