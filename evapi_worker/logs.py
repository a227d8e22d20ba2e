"""Structured log lines: ``key=value`` pairs (logfmt), one line per record.

Values come from the network, so :func:`kv` quotes and escapes them: a CR or
LF in a User-Agent can never forge a second log line.
"""

from __future__ import annotations

import logging
import math
import re
import sys
import time
from collections.abc import Hashable
from typing import Final, Generic, TypeVar

__all__ = ["AccountTally", "LogfmtFormatter", "Throttle", "kv", "setup_logging"]

# Regular expressions, not loops over characters: two log lines go out for
# every fake call, a thousand of them in a burst.
_BARE_OK: Final = re.compile(r"[A-Za-z0-9\-_.:/@+%*~()\[\]<>,;!?]+")
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")


def _hex(match: re.Match[str]) -> str:
    return f"\\x{ord(match.group()):02x}"


def _value(value: object) -> str:
    if value is None:
        return '""'
    if isinstance(value, float):
        text = f"{value:.6f}".rstrip("0").rstrip(".")
        return text or "0"
    text = str(value)
    if _BARE_OK.fullmatch(text):
        return text
    escaped = _CONTROL.sub(_hex, text.replace("\\", "\\\\").replace('"', '\\"'))
    return f'"{escaped}"'


def kv(**fields: object) -> str:
    """``a=1 b="two words"`` with every value escaped."""
    return " ".join(f"{key}={_value(value)}" for key, value in fields.items())


K = TypeVar("K", bound=Hashable)


class AccountTally:
    """Counts by kind (a table, a reason) and account, for a log line per
    kind and ``every`` seconds at most naming the accounts that count most:
    accounts come from the network, so at most ``max_accounts`` are kept
    apart per kind (the rest count under ``*``)."""

    def __init__(self, every: float = 1.0, max_accounts: int = 256) -> None:
        self.every = every
        self.max_accounts = max_accounts
        self._counts: dict[str, dict[str, int]] = {}
        self._logged_at = -math.inf

    def add(self, kind: str, account: str, count: int) -> None:
        accounts = self._counts.setdefault(kind, {})
        if account not in accounts and len(accounts) >= self.max_accounts:
            account = "*"
        accounts[account] = accounts.get(account, 0) + count

    def due(self, now: float, named: int = 5) -> list[tuple[str, dict[str, object]]]:
        """Each kind counted since the last line, when a line may be logged
        now: (kind, its fields: count, accounts "name:n,...", more_accounts)."""
        if not self._counts or now < self._logged_at + self.every:
            return []
        out: list[tuple[str, dict[str, object]]] = []
        for kind, accounts in self._counts.items():
            top = sorted(accounts.items(), key=lambda item: -item[1])[:named]
            fields: dict[str, object] = {
                "count": sum(accounts.values()),
                "accounts": ",".join(f"{account}:{n}" for account, n in top),
                "more_accounts": len(accounts) - len(top),
            }
            out.append((kind, fields))
        self._counts.clear()
        self._logged_at = now
        return out


class Throttle(Generic[K]):
    """At most one log line per key (node and reason, say) and ``every``
    seconds, however many times it happens: a flood of bad input costs a
    counter, not the disk. Each line says how many occurrences it stands
    for; what a quiet spell leaves unsaid comes out of :meth:`due`."""

    def __init__(self, every: float = 1.0) -> None:
        self.every = every
        self._last: dict[K, float] = {}
        self._unsaid: dict[K, int] = {}

    def note(self, key: K, now: float) -> int:
        """One occurrence at ``now``: the count to log with it, or 0 (say
        nothing now: it is counted into a later line)."""
        if now - self._last.get(key, -math.inf) >= self.every:
            self._last[key] = now
            return self._unsaid.pop(key, 0) + 1
        self._unsaid[key] = self._unsaid.get(key, 0) + 1
        return 0

    def due(self, now: float) -> list[tuple[K, int]]:
        """Keys whose unsaid occurrences may be logged now, with their counts."""
        out = [(k, n) for k, n in self._unsaid.items() if now - self._last[k] >= self.every]
        for key, _ in out:
            del self._unsaid[key]
            self._last[key] = now
        if len(self._last) > 4096:  # keys come from the network: stay bounded
            self._last = {k: t for k, t in self._last.items() if now - t < self.every or k in self._unsaid}
        return out


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
    # No thread, process or source-line details in the records (the format
    # shows none of them): gathering them cost a third of every line.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger("evapi_worker")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
