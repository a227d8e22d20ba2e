"""Memory per tracked call: the engine holding a million calls.

    .venv/bin/python -m bench.memory --calls 1000000

Feeds the engine a call_start for each call (and an end for every other
one, as a busy platform has), parsed from the same JSON Kamailio sends, then
reads the process's resident memory. Nothing expires: the clock stands still.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

from evapi_worker.engine import Engine, EngineSettings
from evapi_worker.events import parse_event
from evapi_worker.service import tune_gc


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1_000_000)
    args = parser.parse_args()
    tune_gc()
    engine = Engine(EngineSettings(max_calls=args.calls + 1, ring_timeout=1e9, window=1e9))
    gc.collect()
    before = rss_bytes()
    started = time.perf_counter()
    for n in range(args.calls):
        start = {
            "event": "call_start", "node": "kam1", "ts": 1_700_000_000 + n / 1000, "seq": 2 * n, "boot": 1,
            "call_id": f"{n:016x}-{n}@203.0.113.7", "aor": f"user{n % 50_000}@example.com",
            "from_user": f"+4930{n:08d}", "from_name": "Caller Name",
        }  # fmt: skip
        engine.handle(parse_event(json.dumps(start)).event, 0.0)
        if n % 2:
            end = {"event": "call_answered", "node": "kam1", "ts": 1_700_000_001 + n / 1000, "seq": 2 * n + 1,
                   "call_id": start["call_id"]}  # fmt: skip
            engine.handle(parse_event(json.dumps(end)).event, 0.0)
    gc.collect()
    used = rss_bytes() - before
    print(f"tracked calls: {engine.call_count:,} in {time.perf_counter() - started:.1f} s")
    print(f"memory: {used / 2**20:,.0f} MiB, {used / engine.call_count:,.0f} bytes per call")


if __name__ == "__main__":
    main()
