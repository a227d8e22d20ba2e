#!/usr/bin/env bash
# Set up a fresh Debian machine for evapi-worker: Kamailio 5.6 (with its
# evapi, jansson, TLS and SQLite modules), SIPp, openssl and Prometheus from
# Debian's packages (when missing), then a virtual environment in .venv with
# the package installed. With --test first, its test tools too; extra Debian
# package names given as arguments are installed as well (scripts/test.sh
# adds the test-only ones).
set -euo pipefail
cd "$(dirname "$0")/.."

target="."
if [ "${1:-}" = "--test" ]; then
    target=".[test]"
    shift
fi
packages=(kamailio kamailio-extra-modules kamailio-json-modules kamailio-tls-modules kamailio-sqlite-modules
          sip-tester openssl prometheus "$@")
missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # Installing the kamailio package just started its system service on
    # port 5060, which the demo uses by default: stop and disable that one
    # service, which this run brought up. A Kamailio that was running before
    # is never touched.
    if [[ " ${missing[*]} " == *" kamailio "* ]]; then
        if command -v systemctl >/dev/null && systemctl is-active --quiet kamailio 2>/dev/null; then
            $sudo systemctl disable --now kamailio >/dev/null 2>&1 || true
            echo "setup: stopped and disabled the kamailio service the package started" >&2
        elif [ -f /run/kamailio/kamailio.pid ] && $sudo kill -0 "$(cat /run/kamailio/kamailio.pid)" 2>/dev/null; then
            $sudo kill "$(cat /run/kamailio/kamailio.pid)" || true
            command -v update-rc.d >/dev/null && $sudo update-rc.d kamailio disable >/dev/null 2>&1 || true
            echo "setup: stopped and disabled the kamailio service the package started" >&2
        fi
    fi
    # Likewise redis-server's service (the tests start redis-servers of their
    # own on ports they choose); one that ran before is never touched.
    if [[ " ${missing[*]} " == *" redis-server "* ]] && command -v systemctl >/dev/null \
        && systemctl is-active --quiet redis-server 2>/dev/null; then
        $sudo systemctl disable --now redis-server >/dev/null 2>&1 || true
        echo "setup: stopped and disabled the redis-server service the package started" >&2
    fi
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# A regular (not editable) install: what users get from `pip install .`,
# at the versions CI checked (requirements/lock.txt; scripts/lock.sh makes it).
.venv/bin/python -m pip install -q -c requirements/lock.txt "$target"
