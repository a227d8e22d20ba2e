"""The bundled Kamailio config passes `kamailio -c`, as shipped and with settings."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from evapi_worker.lab.kamailio_process import bundled_kamailio_cfg

pytestmark = pytest.mark.skipif(shutil.which("kamailio") is None, reason="needs kamailio")


@pytest.mark.parametrize(
    "defines",
    [
        [],
        ["EVW_SIP_IP=127.0.0.2", "EVW_SIP_PORT=5070", 'EVW_NODE="edge-1"', 'EVW_EVAPI_ADDR="127.0.0.1:9448"'],
        ['EVW_WORKER_ADDRS="^127[.]0[.]0[.]3$"', 'EVW_PUSH_UA="MyApp.*iOS"'],
        ["EVW_DOMAIN=voip.example.org", "EVW_WITH_TLS", "EVW_TLS_PORT=5071", "EVW_PUSH_HOLD=45"],
        ['EVW_EVAPI_CLIENTS="^(127[.]0[.]0[.]1|192[.]0[.]2[.]5)$"', "EVW_QUEUE_SIZE=1000", 'EVW_CTL="unix:/tmp/c"'],
        ["EVW_WITH_AUTH", 'EVW_DB_URL="sqlite:////tmp/evw-check.sqlite"', "EVW_USE_DOMAIN=0"],
        ["EVW_UDP_BUFFER=4194304", "EVW_TCP_MAX_CONNECTIONS=8192", "EVW_WITH_TLS"],
        [
            "EVW_WITH_AUTH",
            "EVW_KNOWN_IN_DB",
            'EVW_DB_URL="sqlite:////tmp/c.sqlite"',
            'EVW_SQL_CON="evw=>sqlite:////tmp/c.sqlite"',
        ],
    ],
)
def test_config_checks(defines: list[str]) -> None:
    args = ["kamailio", "-c", "-f", str(bundled_kamailio_cfg())]
    for define in defines:
        args += ["-A", define]
    result = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "config file ok" in result.stderr.lower() + result.stdout.lower()


def test_drop_in_files_ship_beside_the_config() -> None:
    folder = bundled_kamailio_cfg().parent
    assert (folder / "evapi-worker-defs.cfg").is_file()
    assert (folder / "evapi-worker-routes.cfg").is_file()
