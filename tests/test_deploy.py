"""The deployment kit: the systemd unit passes systemd-analyze verify."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).parent.parent / "deploy" / "systemd" / "evapi-worker.service"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze (apt-get install systemd)")
def test_systemd_unit_verifies_clean(tmp_path: Path) -> None:
    # The unit names /usr/local/bin/evapi-worker; verify checks that the
    # command exists, so point it at this installation's.
    worker = Path(sys.executable).with_name("evapi-worker")
    unit = tmp_path / "evapi-worker.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/evapi-worker", str(worker)))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    # Unknown or misspelt settings are only warned about: none may appear.
    assert result.stderr.strip() == "", result.stderr


def test_systemd_unit_stops_gracefully_and_keeps_state() -> None:
    text = UNIT.read_text()
    for line in ("KillMode=mixed", "StateDirectory=evapi-worker", "Restart=on-failure", "ProtectSystem=strict"):
        assert f"\n{line}\n" in text, line
    assert "--state /var/lib/evapi-worker/" in text
