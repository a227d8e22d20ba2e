#!/usr/bin/env bash
# Every benchmark, one after the other (about six minutes); results go to
# stdout, and the figures are recorded by hand in BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
py=.venv/bin/python
for bench in "ingest --calls 100000" "replay --calls 100000" "latency --rate 20000 --seconds 5" \
             "memory --calls 1000000" "ingest_vs_kamailio --events 200000" \
             "fake_invite_latency --calls 15 --burst 20" "push --pushes 1000 --rate 100" \
             "push --storm 10 --seconds 10" "http --seconds 5" "restore" \
             "burst --accounts 100 --devices 10 --ring-delay 300"; do
    echo "== bench.$bench"
    # shellcheck disable=SC2086
    $py -m bench.$bench 2>/dev/null
done
