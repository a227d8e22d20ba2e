"""The docs name what the code has: every Kamailio define and route a
config file documents is in docs/kamailio.md, with its default; every
settings key in docs/configuration.md; every metric in docs/metrics.md;
every module in the README's layout."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import msgspec

from evapi_worker.bundled import bundled
from evapi_worker.config import Config
from evapi_worker.core.links import CommandFailure
from evapi_worker.core.outcomes import Outcome
from evapi_worker.metrics import DECISIONS, EVENT_ERROR_REASONS, PUSH_RESULTS, SHARED_CLAIM_RESULTS, Metrics
from evapi_worker.redis_client import Lost

ROOT = Path(__file__).resolve().parent.parent.parent
GUIDE = (ROOT / "docs" / "kamailio.md").read_text()


def _header(name: str) -> str:
    """The comment block a config file opens with."""
    lines = bundled("kamailio", name).read_text().splitlines()
    return "\n".join(line for line in lines[: next(i for i, x in enumerate(lines) if not x.startswith("#"))])


def test_every_define_the_config_files_document_is_in_the_guide() -> None:
    names = set()
    for name in ("evapi-worker-defs.cfg", "kamailio.cfg"):
        names |= set(re.findall(r"\bEVW_[A-Z0-9_]+\b", _header(name)))
    assert len(names) > 20
    missing = sorted(n for n in names if f"`{n}`" not in GUIDE)
    assert missing == []


def test_every_define_the_files_set_a_default_for_is_in_the_settings_table() -> None:
    defaults: dict[str, str] = {}
    for name in ("evapi-worker-defs.cfg", "kamailio.cfg"):
        text = bundled("kamailio", name).read_text()
        for define, value in re.findall(r"#!ifndef (EVW_\w+)\n#!define \1 (.+)\n", text):
            defaults[define] = value.strip()
    assert "EVW_NODE" in defaults and "EVW_QUEUE_SIZE" in defaults
    rows = {m[0]: m[1] for m in re.findall(r"^\| `(EVW_\w+)`[^|]*\| ([^|]*) \|", GUIDE, re.MULTILINE)}
    for define, value in defaults.items():
        row = next((v for k, v in rows.items() if k == define), None)
        if row is None:  # a row naming two defines (`EVW_SIP_IP`, `EVW_SIP_PORT`), or with a | in its default
            row = next(line for line in GUIDE.splitlines() if line.startswith("| `EVW_") and f"`{define}`" in line)
        assert value.strip('"') in row.replace("\\|", "|"), (define, value, row)


def test_every_route_to_call_is_in_the_guides_route_table() -> None:
    routes = set(re.findall(r"route\((EVW_[A-Z_]+)\);", _header("evapi-worker-routes.cfg")))
    assert {"EVW_SCREEN", "EVW_FAKE_CALL", "EVW_CALL_START", "EVW_HOLD", "EVW_REGISTERED"} <= routes
    table = {m for m in re.findall(r"^\| `route\((EVW_[A-Z_]+)\);`", GUIDE, re.MULTILINE)}
    assert routes <= table, routes - table
    for route in routes:  # and every one a step of the guide names
        assert f"route({route});" in GUIDE.split("## The files")[0], route


def _keys(struct: type, prefix: str = "") -> set[str]:
    """Every settings key a struct (and the tables under it) takes, as
    ``table.key``."""
    keys = set()
    for field in msgspec.structs.fields(struct):
        hints = [a for a in typing.get_args(field.type) if isinstance(a, type)] or [field.type]
        nested = next((h for h in hints if isinstance(h, type) and issubclass(h, msgspec.Struct)), None)
        if field.encode_name == "kamailio":
            continue  # [[kamailio]] tables: name, evapi, sip (parsed by the loader)
        if nested is not None:
            keys |= _keys(nested, f"{prefix}{field.encode_name}.")
        else:
            keys.add(prefix + field.encode_name)
    return keys


def test_every_settings_key_is_in_the_configuration_doc() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    block = doc.split("```toml\n", 1)[1].split("```\n", 1)[0]
    keys = _keys(Config) | {"kamailio.name", "kamailio.evapi", "kamailio.sip"}
    assert len(keys) > 50
    missing = []
    for key in sorted(keys):
        table, _, name = key.rpartition(".")
        # In the example: under its [table] (or [[kamailio]]), set or commented out.
        header = f"[[{table}]]" if table == "kamailio" else f"[{table}]"
        part = block if not table else block.split(header, 1)[-1] if header in block else ""
        if not re.search(rf"^#? ?{re.escape(name)} = ", part, re.MULTILINE):
            missing.append(key)
    assert missing == []


def test_every_metric_the_worker_exports_is_in_the_metrics_doc() -> None:
    metrics = Metrics()
    names = {m.name for m in metrics.registry.collect()}
    assert len(names) > 30
    doc = (ROOT / "docs" / "metrics.md").read_text()
    families = re.findall(r"`(evapi_worker_\w+)`", doc)
    # Rows may name siblings by their suffix: `evapi_worker_a_total`, `_b_total`.
    suffixes = re.findall(r"`(_\w+)`", doc)
    listed = {f.removesuffix("_total").removesuffix("_info") for f in families}
    listed |= {"evapi_worker" + s.removesuffix("_total") for s in suffixes}
    missing = sorted(n for n in names if n not in listed and n.removesuffix("_info") not in listed)
    assert missing == []


def _row(doc: str, metric: str) -> str:
    return next(line for line in doc.splitlines() if line.startswith("|") and f"`{metric}" in line)


def test_every_label_value_the_code_counts_by_is_in_the_metrics_doc() -> None:
    doc = (ROOT / "docs" / "metrics.md").read_text()
    for metric, values in [
        ("evapi_worker_commands_failed_total", [f.value for f in CommandFailure]),
        ("evapi_worker_fake_calls_total", [o.value for o in Outcome]),
        ("evapi_worker_event_errors_total", list(EVENT_ERROR_REASONS)),
        ("evapi_worker_pushes_total", list(PUSH_RESULTS)),
        ("evapi_worker_shared_claims_total", list(SHARED_CLAIM_RESULTS)),
        ("evapi_worker_decisions_total", sorted({f"{a}:{r}" for a, r in DECISIONS})),
        ("evapi_worker_redis_lost_total", [w.value for w in Lost]),
    ]:
        row = _row(doc, metric)
        missing = [v for v in values if f"`{v}`" not in row]
        assert missing == [], (metric, missing)


def test_every_module_is_in_the_readme_layout_and_only_those() -> None:
    readme = (ROOT / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    listed: set[str] = set()
    for cell in re.findall(r"^\| (`[^|]+) \|", layout, re.M):
        listed |= set(re.findall(r"`evapi_worker/([\w/]+\.py)`", cell))
    package = ROOT / "evapi_worker"
    modules = {str(p.relative_to(package)) for p in package.rglob("*.py") if p.name != "__init__.py"}
    assert sorted(modules - listed) == [] and sorted(listed - modules) == []


def test_every_guide_installs_the_worker_the_same_way_with_the_tested_versions() -> None:
    """The README, the Kamailio guide and the unit's comment give one
    install command, and it pins what the tests ran with (a constraints
    file the repository keeps)."""
    root = Path(__file__).parent.parent.parent
    command = "/opt/evapi-worker/bin/pip install -c requirements/lock.txt ."
    for name in ("README.md", "docs/kamailio.md", "deploy/systemd/evapi-worker.service"):
        text = (root / name).read_text()
        installs = re.findall(r"/opt/evapi-worker/bin/pip install[^\n#]*", text)
        assert installs and all(i.strip() == command for i in installs), (name, installs)
    assert (root / "requirements" / "lock.txt").is_file()
