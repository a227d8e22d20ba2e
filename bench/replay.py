"""Replay benchmark: events/s from a capture file through parsing and the engine.

    .venv/bin/python -m bench.replay --calls 100000
    .venv/bin/python -m bench.replay --events 1000000 --report

Writes a capture of the synthetic stream (bench/events.py) to a temporary
file in the worker's own capture format (the record log), as it is made
(a day of events never sits in memory). Then, without ``--report``, times
`load_records` + `replay` over it in this process, as `evapi-worker replay`
runs them; with ``--report``, runs `evapi-worker replay FILE --report OUT`
itself and reports its time and its peak memory (the decisions it prints
go to /dev/null).
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from evapi_worker.core.engine import EngineSettings
from evapi_worker.core.records import CAPTURE_MAGIC, FILE_CLOCK, FRAME, frame
from evapi_worker.replay import load_records, replay
from evapi_worker.runtime import tune_gc

from .events import payloads

START = 1_700_000_000.0
# The worker reads each event this long after Kamailio stamped it.
READ_AFTER = 0.0005


def write_capture(path: Path, calls: int) -> int:
    """The stream of ``calls`` calls as a capture; returns its events."""
    count = 0
    with path.open("wb") as f:
        f.write(CAPTURE_MAGIC + frame([FILE_CLOCK, 0.0]))
        batch: list[object] = []
        # Events stamped 1 ms apart from START (the receive clock and the
        # events' clock agree, as on a node and a worker on NTP).
        for payload in payloads(calls, start=START):
            count += 1
            batch.append(("kam1", count, START + count * 0.001 + READ_AFTER, payload))
            if len(batch) == 256:  # as the capture writer groups them
                f.write(frame([FRAME, batch]))
                batch = []
        if batch:
            f.write(frame([FRAME, batch]))
    return count


_COMMAND = "import sys; from evapi_worker.cli import main; sys.exit(main(sys.argv[1:]))"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--calls", type=int, default=100_000)
    size.add_argument("--events", type=int, help="about this many events (3.25 per call)")
    parser.add_argument("--report", action="store_true", help="time `evapi-worker replay --report` instead")
    args = parser.parse_args()
    calls = round(args.events / 3.25) if args.events else args.calls
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.evcap"
        events = write_capture(path, calls)
        size_mb = path.stat().st_size / 1e6
        if args.report:
            out = Path(tmp) / "report.html"
            started = time.perf_counter()
            command = [sys.executable, "-c", _COMMAND, "replay", str(path), "--report", str(out)]
            subprocess.run(command, stdout=subprocess.DEVNULL, check=True)
            elapsed = time.perf_counter() - started
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
            print(f"events: {events:,}, file: {size_mb:,.0f} MB, report: {out.stat().st_size:,} bytes")
            print(f"replay --report: {elapsed:.1f} s, {events / elapsed:,.0f} events/s, peak memory {peak:,.0f} MiB")
            return
        tune_gc()  # as the command does
        started = time.perf_counter()
        result = replay(load_records([path], []), EngineSettings(), keep=False)
        elapsed = time.perf_counter() - started
    decided = sum(result.decided.values())
    print(f"events: {events}, decisions: {decided}, file: {path.name}")
    print(f"elapsed: {elapsed:.3f} s, rate: {events / elapsed:,.0f} events/s")


if __name__ == "__main__":
    main()
