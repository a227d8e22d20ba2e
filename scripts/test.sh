#!/usr/bin/env bash
# Everything CI checks: set-up, lint, types, the installed package, the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
# --fast: the unit tier alone (no process, no network; seconds), once set up.
if [ "${1:-}" = "--fast" ]; then
    shift
    [ -x .venv/bin/python ] || ./scripts/setup.sh --test
    exec .venv/bin/python -m pytest -m unit "$@"
fi
# Test-only packages: linphone-cli, a real liblinphone phone (linphonec) for
# the end-to-end tests; systemd, for systemd-analyze verify of the unit;
# chromium, which renders the replay report in its test; patch, which applies
# kamailio/examples/debian-stock.patch to the stock config in its test;
# redis-server and kamailio-redis-modules, for the events-through-Redis tests
# (each starts its own redis-server on a port of its own).
./scripts/setup.sh --test linphone-cli systemd chromium patch redis-server kamailio-redis-modules
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
# The installed command and its bundled files work from any folder.
root=$PWD
(
    cd "$(mktemp -d)"
    "$root/.venv/bin/evapi-worker" --version
    "$root/.venv/bin/python" -c 'from evapi_worker.sipp_runner import bundled_scenario as b; assert b().is_file(), b()'
    "$root/.venv/bin/python" -c 'from evapi_worker.lab.kamailio_process import bundled_kamailio_cfg as k; assert k().is_file(), k()'
    "$root/.venv/bin/evapi-worker" kamailio-files copied >/dev/null
    for f in evapi-worker-defs.cfg evapi-worker-routes.cfg debian-stock.patch evapi-worker-kamailio.cfg late_call.xml; do test -s "copied/$f"; done
)
.venv/bin/python -m pytest "$@"
