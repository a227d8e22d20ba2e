"""The deployment kit: the systemd unit passes systemd-analyze verify."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).parent.parent / "deploy" / "systemd" / "evapi-worker.service"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze (apt-get install systemd)")
def test_systemd_unit_verifies_clean_as_shipped() -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(UNIT)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    # Unknown or misspelt settings are only warned about: none may appear.
    assert result.stderr.strip() == "", result.stderr


def test_the_unit_finds_the_worker_where_its_own_comment_installs_it() -> None:
    text = UNIT.read_text()
    assert "python3 -m venv /opt/evapi-worker && /opt/evapi-worker/bin/pip install" in text
    assert "\nEnvironment=PATH=/opt/evapi-worker/bin:" in text
    assert "\nExecStart=/usr/bin/env evapi-worker run " in text
    assert "kamailio(8)" not in text
    # The command resolves through that PATH, as env will resolve it: here
    # with this installation's folder put where the venv would be.
    path = text.split("\nEnvironment=PATH=", 1)[1].split("\n", 1)[0]
    here = str(Path(sys.executable).parent)
    found = shutil.which("evapi-worker", path=path.replace("/opt/evapi-worker/bin", here))
    assert found == str(Path(here) / "evapi-worker")


def test_systemd_unit_stops_gracefully_and_keeps_state() -> None:
    text = UNIT.read_text()
    for line in ("KillMode=mixed", "StateDirectory=evapi-worker", "Restart=on-failure", "ProtectSystem=strict"):
        assert f"\n{line}\n" in text, line
    assert "--state /var/lib/evapi-worker/" in text
