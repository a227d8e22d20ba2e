#!/usr/bin/env bash
# Set up (see setup.sh), then run the loopback demo: Kamailio, the worker and
# SIPp phones; a late iPhone gets the call it missed. Extra arguments go to
# `evapi-worker demo` (try --help).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/evapi-worker demo "$@"
