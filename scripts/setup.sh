#!/usr/bin/env bash
# Set up a fresh Debian machine for evapi-worker: Kamailio 5.6 (with its
# evapi, jansson, TLS and SQLite modules), SIPp, openssl and Prometheus from
# Debian's packages (when missing), then a virtual environment in .venv with
# the package and its test tools installed. Extra package names given as
# arguments are installed too (scripts/test.sh adds the test-only ones).
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(kamailio kamailio-extra-modules kamailio-json-modules kamailio-tls-modules kamailio-sqlite-modules
          sip-tester openssl prometheus "$@")
missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}" >&2
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The Debian package starts a system Kamailio on port 5060; the demo and the
# tests run their own instances, so keep the system one out of the way.
if pgrep -x kamailio >/dev/null && [ -f /run/kamailio/kamailio.pid ]; then
    kill "$(cat /run/kamailio/kamailio.pid)" 2>/dev/null || true
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# A regular (not editable) install: what users get from `pip install .`.
.venv/bin/python -m pip install -q ".[test]"
