"""evapi-worker kamailio-files: where the installed drop-ins are, and a copy of them."""

from __future__ import annotations

from pathlib import Path

import pytest

from evapi_worker.cli import main


def test_the_files_are_listed_where_they_are_installed(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kamailio-files"]) == 0
    paths = [Path(line) for line in capsys.readouterr().out.splitlines()]
    names = [p.name for p in paths]
    assert names == [
        "evapi-worker-defs.cfg", "evapi-worker-routes.cfg", "debian-stock.patch", "kamailio.cfg", "late_call.xml",
    ]  # fmt: skip
    assert all(p.is_file() and p.is_absolute() for p in paths)
    assert "include_file" in paths[3].read_text()  # the complete config includes the drop-ins


def test_a_copy_never_replaces_an_edited_file_unless_forced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "kamailio-evw"
    assert main(["kamailio-files", str(target)]) == 0
    assert sorted(p.name for p in target.iterdir()) == [
        "debian-stock.patch", "evapi-worker-defs.cfg", "evapi-worker-kamailio.cfg", "evapi-worker-routes.cfg",
        "late_call.xml",
    ]  # fmt: skip
    assert main(["kamailio-files", str(target)]) == 0  # the same files again: nothing to protect
    (target / "kamailio.cfg").write_text("# the operator's own\n")  # never touched
    edited = target / "evapi-worker-kamailio.cfg"
    edited.write_text(edited.read_text() + "# mine\n")
    (target / "evapi-worker-defs.cfg").unlink()
    capsys.readouterr()
    assert main(["kamailio-files", str(target)]) == 2
    assert "evapi-worker-kamailio.cfg" in capsys.readouterr().err and edited.read_text().endswith("# mine\n")
    assert not (target / "evapi-worker-defs.cfg").exists()  # nothing copied when one differs
    assert main(["kamailio-files", str(target), "--force"]) == 0
    assert not edited.read_text().endswith("# mine\n") and (target / "evapi-worker-defs.cfg").is_file()
    assert (target / "kamailio.cfg").read_text() == "# the operator's own\n"
