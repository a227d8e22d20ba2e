"""The docs name what the code has: every Kamailio define and route a
config file documents is in docs/kamailio.md, with its default."""

from __future__ import annotations

import re
from pathlib import Path

from evapi_worker.bundled import bundled

ROOT = Path(__file__).resolve().parent.parent
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
        if row is None:  # a row naming two defines: `EVW_SIP_IP`, `EVW_SIP_PORT`
            row = next(line for line in GUIDE.splitlines() if line.startswith("|") and f"`{define}`" in line)
        assert value.strip('"') in row.replace("\\|", "|"), (define, value, row)


def test_every_route_to_call_is_in_the_guides_route_table() -> None:
    routes = set(re.findall(r"route\((EVW_[A-Z_]+)\);", _header("evapi-worker-routes.cfg")))
    assert {"EVW_SCREEN", "EVW_FAKE_CALL", "EVW_CALL_START", "EVW_HOLD", "EVW_REGISTERED"} <= routes
    table = {m for m in re.findall(r"^\| `route\((EVW_[A-Z_]+)\);`", GUIDE, re.MULTILINE)}
    assert routes <= table, routes - table
    for route in routes:  # and every one a step of the guide names
        assert f"route({route});" in GUIDE.split("## The files")[0], route
