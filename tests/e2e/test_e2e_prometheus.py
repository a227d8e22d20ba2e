"""The dashboard and alert rules against a real Prometheus scraping the worker
while real Kamailio and SIPp phones make a late-registration story."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from evapi_worker.config import Config
from evapi_worker.core.outcomes import Outcome
from evapi_worker.http_server import respond

from ..e2e_platform import DOMAIN, HOST, late_iphone, platform
from ..helpers import needs_redis
from ..sipp_device import free_port

ROOT = Path(__file__).parent.parent.parent
DASHBOARD = ROOT / "grafana" / "dashboards" / "evapi-worker.json"
RULES = ROOT / "grafana" / "alerts"

needs = pytest.mark.skipif(
    not all(shutil.which(b) for b in ("prometheus", "promtool", "kamailio", "sipp")),
    reason="needs prometheus, promtool, kamailio and sipp from Debian's packages",
)


def dashboard_exprs() -> list[tuple[str, str]]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(p["title"], t["expr"]) for p in panels for t in p["targets"]]


def concrete(expr: str) -> str:
    """Grafana's variables as a short test would set them."""
    return expr.replace("$__rate_interval", "20s").replace("$__range", "5m").replace('"$node"', '".*"')


@needs
def test_alert_rules_check_and_pass_their_unit_tests() -> None:
    for args in (["check", "rules", "evapi-worker-rules.yml"], ["test", "rules", "evapi-worker-rules.test.yml"]):
        result = subprocess.run(["promtool", *args], cwd=RULES, capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_names_only_metrics_and_labels_the_worker_exports() -> None:
    from evapi_worker.http_server import MetricsPage
    from evapi_worker.metrics import Metrics

    metrics = Metrics()
    metrics.init_series(["n1"], redis=True)
    exposition = (
        respond("GET", "/metrics", MetricsPage(metrics.registry), lambda: (True, []), 0.0)
        .decode()
        .split("\r\n\r\n", 1)[1]
    )
    samples: dict[str, set[str]] = {}
    for line in exposition.splitlines():
        if line.startswith("#") or not line:
            continue
        name = re.split(r"[{ ]", line, maxsplit=1)[0]
        labels = set(re.findall(r'(\w+)="', line))
        samples.setdefault(name, set()).update(labels)
    for title, expr in dashboard_exprs():
        names = set(re.findall(r"\bevapi_worker_\w+", expr))
        assert names, title
        for name in names:
            assert name in samples, f"{title}: {name} is not exported"
        used = set(re.findall(r"(\w+)\s*=~?\s*\"", expr)) | {
            label.strip() for group in re.findall(r"by \(([^)]*)\)", expr) for label in group.split(",")
        }
        # Prometheus adds the target's own labels at each scrape.
        exported = set().union(*(samples[n] for n in names), {"instance", "job"})
        assert used <= exported, f"{title}: labels {used - exported} are not exported"


def test_redis_series_are_exported_only_by_a_worker_with_redis() -> None:
    """A 0 from a worker without [redis] would read as Redis down (and fire
    EvapiWorkerRedisDisconnected); a worker with it that never connected
    must read 0."""
    from evapi_worker.config import RedisSettings
    from evapi_worker.service import Service

    def exported(service: Service) -> set[str]:
        return {m.name for m in service.metrics.registry.collect() if m.name.startswith("evapi_worker_redis")}

    assert exported(Service(Config())) == set()
    with_redis = Service(Config(redis=RedisSettings(url="redis://127.0.0.1:1/0")))
    assert with_redis.metrics.value("evapi_worker_redis_connected") == 0
    assert exported(with_redis) == {
        "evapi_worker_redis_connected",
        "evapi_worker_redis_connects",
        "evapi_worker_redis_lost",
    }


@asynccontextmanager
async def prometheus(folder: Path, target_port: int) -> AsyncIterator[int]:
    port = free_port(socket.SOCK_STREAM)
    (folder / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:\n  - {RULES / 'evapi-worker-rules.yml'}\n"
        "scrape_configs:\n  - job_name: evapi-worker\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{target_port}']\n"
    )
    args = [
        "prometheus", f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]  # fmt: skip
    with (folder / "prometheus.log").open("wb") as log:
        proc = await trio.lowlevel.open_process(args, stdout=log, stderr=log, start_new_session=True)
    try:
        with trio.fail_after(20):
            while (await http_get(port, "/-/ready"))[0] != 200:
                await trio.sleep(0.2)
        yield port
    finally:
        proc.terminate()
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        return 0, b""
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split()[1]) if head else 0
    return status, body


async def query(port: int, expr: str) -> list[Any]:
    status, body = await http_get(port, "/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert status == 200, (expr, body[:500])
    answer = json.loads(body)
    assert answer["status"] == "success", answer
    result: list[Any] = answer["data"]["result"]
    return result


@needs
@needs_redis
async def test_every_dashboard_panel_returns_data_from_a_real_prometheus(tmp_path: Path) -> None:
    # With [redis]: the Redis panel's series exist only then.
    metrics_port = free_port(socket.SOCK_STREAM)
    async with (
        platform(tmp_path, DOMAIN, redis=True, metrics=(HOST, metrics_port)) as p,
        prometheus(tmp_path, metrics_port) as prom,
    ):
        # Prometheus must see the counters at zero before the story moves them.
        with trio.fail_after(20):
            while not await query(prom, 'up{job="evapi-worker"} == 1'):
                await trio.sleep(0.2)
        outcome, _ = await late_iphone(p, "bob", "phone_answers", "prom-answered-1@127.0.0.1")
        assert outcome is Outcome.COMPLETED
        with trio.fail_after(20):
            while not await query(prom, "increase(evapi_worker_fake_calls_sent_total[20s]) > 0"):
                await trio.sleep(0.5)
        for title, expr in dashboard_exprs():
            assert await query(prom, concrete(expr)), f"panel {title!r}: no data for {expr}"
        up = await query(prom, 'up{job="evapi-worker"}')
        assert up[0]["value"][1] == "1"
        alerts = await query(prom, "ALERTS")
        assert [a for a in alerts if a["metric"]["alertstate"] == "firing"] == []
