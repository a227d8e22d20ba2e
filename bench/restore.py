"""A restart over the largest journal the worker keeps.

    .venv/bin/python -m bench.restore

Journals on disk are bounded (``persistence.MAX_JOURNALS``, 32 MiB: the
oldest are removed past it while snapshots fail). This writes that much
journal of the synthetic stream (bench/events.py) with no snapshot, then
starts the real ``evapi-worker run --state`` over it and measures the time
from the process start to its ``state restored`` line (from there it
serves), and its peak memory then.

Target: serving within 10 s of the start, in under 300 MiB.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from evapi_worker.core.engine import Engine
from evapi_worker.persistence import MAX_JOURNALS, StateStore

from .events import stream


def write_journal(path: Path) -> tuple[int, int]:
    """Events journaled until the journals reach their bound: (events, bytes)."""
    store = StateStore(path, time.time(), lambda file, exc: print(f"{file}: {exc}", file=sys.stderr))
    store.restore(Engine(), 0.0, lambda _node, _payload, _now: [])
    events, now = 0, 0.0
    while True:
        for frame in stream(20_000, start=time.time() - 3600):
            payload = frame.split(b":", 1)[1][:-1]  # the netstring's payload
            store.note_event("kam1", now, payload)
            now += 0.001
            events += 1
            if events % 1000 == 0:
                store.flush()
                size = sum(p.stat().st_size for p in path.parent.glob(path.name + ".journal.*"))
                if size >= MAX_JOURNALS - 64 * 1024:
                    store.close()
                    return events, size


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state.msgpack"
        events, size = write_journal(state)
        print(f"journal: {events:,} events, {size / 1024 / 1024:.1f} MiB (bound {MAX_JOURNALS >> 20} MiB)")
        log = Path(tmp) / "worker.log"
        args = [
            sys.executable, "-m", "evapi_worker.cli", "run", "--kamailio", "kam1=127.0.0.1:9", "--metrics", "off",
            "--state", str(state), "--sipp", "true",
        ]  # fmt: skip
        started = time.monotonic()
        with log.open("wb") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=out)
        try:
            while "state restored" not in log.read_text():
                if proc.poll() is not None:
                    raise SystemExit(f"the worker exited: {log.read_text()[-2000:]}")
                time.sleep(0.01)
            took = time.monotonic() - started
            status = Path(f"/proc/{proc.pid}/status").read_text()
            peak = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024  # type: ignore[union-attr]
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        line = next(line for line in log.read_text().splitlines() if "state restored" in line)
        print(f"serving {took:.2f} s after the start, peak RSS {peak:.0f} MiB")
        print(line.split("state restored ", 1)[1])


if __name__ == "__main__":
    main()
