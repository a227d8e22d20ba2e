"""Replay benchmark: events/s from a capture file through parsing and the engine.

    .venv/bin/python -m bench.replay --calls 100000

Writes a capture of the synthetic stream (bench/events.py) to a temporary
file in the worker's own capture format (the record log), then times
`load_records` + `replay` over it, as `evapi-worker replay` runs them.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from evapi_worker.core.engine import EngineSettings
from evapi_worker.core.netstring import NEED_DATA, NetstringDecoder
from evapi_worker.core.records import CAPTURE_MAGIC, FILE_CLOCK, FRAME, frame
from evapi_worker.replay import load_records, replay
from evapi_worker.runtime import tune_gc

from .events import stream


def write_capture(path: Path, calls: int) -> int:
    decoder = NetstringDecoder()
    decoder.receive_data(b"".join(stream(calls)))
    count = 0
    with path.open("wb") as f:
        f.write(CAPTURE_MAGIC + frame([FILE_CLOCK, 0.0]))
        received = 1_700_000_000.0
        batch: list[object] = []
        while (payload := decoder.next_frame()) is not NEED_DATA:
            assert isinstance(payload, bytes)
            received += 0.001  # 1,000 events/s of recorded time
            batch.append(("kam1", count, received, payload))
            count += 1
            if len(batch) == 256:  # as the capture writer groups them
                f.write(frame([FRAME, batch]))
                batch = []
        if batch:
            f.write(frame([FRAME, batch]))
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.evcap"
        events = write_capture(path, args.calls)
        tune_gc()  # as the command does
        started = time.perf_counter()
        result = replay(load_records([path], []), EngineSettings())
        elapsed = time.perf_counter() - started
    print(f"events: {events}, decisions: {len(result.decisions)}, file: {path.name}")
    print(f"elapsed: {elapsed:.3f} s, rate: {events / elapsed:,.0f} events/s")


if __name__ == "__main__":
    main()
