#!/usr/bin/env bash
# Re-make requirements/lock.txt: the newest versions pyproject.toml allows,
# installed into a throw-away environment, frozen. Run after changing the
# dependencies; commit the result with the change.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q --upgrade pip
"$tmp/venv/bin/python" -m pip install -q ".[test]"
{
    echo "# The exact versions CI and the scripts install (pip constraints)."
    echo "# Made by scripts/lock.sh; change pyproject.toml, then run it again."
    "$tmp/venv/bin/python" -m pip freeze --exclude-editable | grep -v '^evapi-worker'
} > requirements/lock.txt
echo "requirements/lock.txt updated"
