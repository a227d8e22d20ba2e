"""Memory per tracked call: the engine holding a million calls.

    .venv/bin/python -m bench.memory --calls 1000000
    .venv/bin/python -m bench.memory --calls 100000 --worst

Feeds the engine a call_start for each call (and an end for every other
one, as a busy platform has), parsed from the same JSON Kamailio sends, then
reads the process's resident memory. Nothing expires: the clock stands still.

``--worst`` is the bound: every string at the longest length an event may
carry (events.py), every call ended, and each with as many branch replies
(long Contacts with push tokens) as the engine keeps.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

from evapi_worker.core.engine import MAX_RANG, Engine, EngineSettings
from evapi_worker.core.events import MAX_NAME, MAX_SHORT, MAX_URI, parse_event
from evapi_worker.runtime import tune_gc


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _typical(engine: Engine, n: int) -> None:
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


def _long(prefix: str, n: int, length: int) -> str:
    return (f"{prefix}{n:x}-" * (length // 4 + 1))[:length]


def _worst(engine: Engine, n: int) -> None:
    call_id = _long("c", n, MAX_NAME)
    start = {
        "event": "call_start", "node": _long("k", 0, MAX_SHORT), "ts": 1_700_000_000 + n / 1000, "seq": n, "boot": 1,
        "call_id": call_id, "aor": _long("a", n, MAX_NAME), "from_user": _long("u", n, MAX_NAME),
        "from_name": _long("N", n, MAX_NAME), "from_domain": _long("d", n, MAX_NAME), "push": True,
    }  # fmt: skip
    engine.handle(parse_event(json.dumps(start)).event, 0.0)
    for b in range(MAX_RANG):
        contact = _long(f"sip:{b}x", n, MAX_URI - 80) + f";pn-prid={_long('t', n * 100 + b, 64)}"
        reply = {"event": "branch_reply", "node": "k", "ts": 1_700_000_000, "seq": n, "boot": 1,
                 "call_id": call_id, "code": 180, "contact": contact}  # fmt: skip
        engine.handle(parse_event(json.dumps(reply)).event, 0.0)
    end = {"event": "call_failed", "node": "k", "ts": 1_700_000_001, "seq": n, "boot": 1, "call_id": call_id,
           "code": 603}  # fmt: skip
    engine.handle(parse_event(json.dumps(end)).event, 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1_000_000)
    parser.add_argument("--worst", action="store_true", help="longest strings, most branch replies")
    args = parser.parse_args()
    feed = _worst if args.worst else _typical
    tune_gc()
    engine = Engine(EngineSettings(max_calls=args.calls + 1, ring_timeout=1e9, window=1e9))
    gc.collect()
    before = rss_bytes()
    started = time.perf_counter()
    for n in range(args.calls):
        feed(engine, n)
    gc.collect()
    used = rss_bytes() - before
    print(f"tracked calls: {engine.call_count:,} in {time.perf_counter() - started:.1f} s")
    print(f"memory: {used / 2**20:,.0f} MiB, {used / engine.call_count:,.0f} bytes per call")
    if args.worst:
        default = EngineSettings().max_calls
        print(
            f"worst case at the default max_calls ({default:,}): {used / engine.call_count * default / 2**20:,.0f} MiB"
        )


if __name__ == "__main__":
    main()
