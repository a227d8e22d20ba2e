"""The deployment kit: the systemd unit, the Grafana dashboard."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).parent.parent.parent / "deploy" / "systemd" / "evapi-worker.service"
DROP_IN = UNIT.parent / "evapi-worker.service.d" / "push-keys.conf"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze (apt-get install systemd)")
def test_systemd_unit_verifies_clean_as_shipped() -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(UNIT)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    # Unknown or misspelt settings are only warned about: none may appear.
    assert result.stderr.strip() == "", result.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze (apt-get install systemd)")
def test_the_push_keys_drop_in_verifies_clean_beside_the_unit(tmp_path: Path) -> None:
    """Installed as its comment says (beside the unit, in its .d folder):
    systemd reads it (a misspelt setting there is warned about, so none
    is) and passes the keys as credentials named as the settings name them."""
    shutil.copy(UNIT, tmp_path / UNIT.name)
    shutil.copytree(DROP_IN.parent, tmp_path / DROP_IN.parent.name)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(tmp_path / UNIT.name)], capture_output=True, text=True,
        timeout=60, check=False, env={**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path}:"},
    )  # fmt: skip
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr
    text = DROP_IN.read_text()
    assert "\nLoadCredential=apns.p8:/etc/evapi-worker/AuthKey.p8\n" in text
    assert "\nLoadCredential=fcm.json:/etc/evapi-worker/fcm-service-account.json\n" in text
    assert 'key_file = "apns.p8"' in text and 'service_account_file = "fcm.json"' in text
    # The guide shows the same set-up.
    guide = (UNIT.parent.parent.parent / "docs" / "deploy.md").read_text()
    for line in ('key_file = "apns.p8"', "push-keys.conf", "evapi-worker push check"):
        assert line in guide, line


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


DASHBOARD = UNIT.parent.parent.parent / "grafana" / "dashboards" / "evapi-worker.json"


def test_the_dashboard_import_asks_for_a_prometheus_data_source_that_every_panel_uses() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    [wanted] = dashboard["__inputs"]
    assert (wanted["type"], wanted["pluginId"]) == ("datasource", "prometheus")
    variable = next(v for v in dashboard["templating"]["list"] if v["name"] == "datasource")
    assert variable["type"] == "datasource" and variable["query"] == "prometheus"
    # The import replaces ${DS_PROMETHEUS} with the data source chosen; file
    # provisioning leaves it, and the variable then takes the default one.
    assert variable["current"]["value"] == "${" + wanted["name"] + "}"
    panels = [p for p in dashboard["panels"] if p.get("type") != "row"]
    assert panels and all(p["datasource"] == {"type": "prometheus", "uid": "${datasource}"} for p in panels)
    targets = [t for p in panels for t in p.get("targets", []) if "datasource" in t]
    assert all(t["datasource"]["uid"] == "${datasource}" for t in targets)
