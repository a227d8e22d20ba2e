"""Odd files where the real ``evapi-worker run`` keeps its state, keys and
settings: each is one clear line at start, never a hang, a traceback or a
write through a link."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from ..sipp_device import fake_sipp

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="device nodes need root")


async def worker(tmp_path: Path, *args: str, runs: float = 1.5) -> tuple[int, list[str]]:
    """Run the worker ``runs`` seconds (then SIGTERM), or until it exits by
    itself; its exit code and log lines."""
    command = [
        sys.executable, "-m", "evapi_worker.cli", "run", "--kamailio", "127.0.0.1:9", "--metrics", "off",
        "--sipp", str(fake_sipp(tmp_path)), *args,
    ]  # fmt: skip
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        proc = await trio.lowlevel.open_process(command, stdout=out, stderr=out, stdin=subprocess.DEVNULL)
    with trio.move_on_after(runs):
        await proc.wait()
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    with trio.fail_after(30):
        code = await proc.wait()
    lines = log.read_text().splitlines()
    assert not any("Traceback" in line for line in lines), lines
    return code, lines


def said(lines: list[str], *words: str) -> list[str]:
    return [line for line in lines if all(word in line for word in words)]


async def test_a_state_folder_other_users_can_write_is_refused_in_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "state"
    folder.mkdir()
    folder.chmod(0o777)
    code, lines = await worker(tmp_path, "--state", str(folder / "state.msgpack"))
    assert code == 2
    assert lines == [
        f"evapi-worker: config error: state_file: {folder} (the state folder) can be written by other users "
        "(mode 777): chmod go-w it, or use a folder of the worker's own"
    ]


def odd(path: Path, kind: str) -> None:
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "/dev/zero":
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 5))
    elif kind == "link to /dev/urandom":
        path.symlink_to("/dev/urandom")
    else:
        path.mkdir()


KINDS = [
    pytest.param("fifo", "is a FIFO", id="fifo"),
    pytest.param("/dev/zero", "is a character device", id="device", marks=needs_root),
    pytest.param("link to /dev/urandom", "is a symbolic link", id="link"),
    pytest.param("folder", "is a folder", id="folder"),
]


@pytest.mark.parametrize(("kind", "meaning"), KINDS)
async def test_an_odd_snapshot_is_one_line_and_set_aside(tmp_path: Path, kind: str, meaning: str) -> None:
    state = tmp_path / "state.msgpack"
    odd(state, kind)
    code, lines = await worker(tmp_path, "--state", str(state))
    assert code == 0
    assert len(said(lines, "snapshot not restored", meaning)) == 1, lines
    assert state.is_file() and not state.is_symlink()  # written anew at the stop


@pytest.mark.parametrize(("kind", "meaning"), KINDS)
async def test_an_odd_journal_is_one_line(tmp_path: Path, kind: str, meaning: str) -> None:
    state = tmp_path / "state.msgpack"
    odd(tmp_path / "state.msgpack.journal.1", kind)
    code, lines = await worker(tmp_path, "--state", str(state))
    assert code == 0
    assert len(said(lines, "journal not restored", meaning)) == 1, lines


async def test_links_planted_where_the_worker_writes_are_never_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"not the worker's")
    state = tmp_path / "state.msgpack"
    (tmp_path / "state.msgpack.tmp").symlink_to(victim)
    (tmp_path / "state.msgpack.journal.1").symlink_to(victim)  # read at start: not followed
    code, lines = await worker(tmp_path, "--state", str(state))
    assert code == 0
    assert victim.read_bytes() == b"not the worker's"
    assert state.is_file() and not state.is_symlink() and "state saved" in "\n".join(lines)


@pytest.mark.parametrize(("kind", "meaning"), KINDS)
async def test_an_odd_key_file_is_one_config_error(tmp_path: Path, kind: str, meaning: str) -> None:
    key = tmp_path / "AuthKey.p8"
    odd(key, kind)
    settings = tmp_path / "worker.toml"
    settings.write_text(f'[push.apns]\nkey_file = "{key}"\nkey_id = "ABC123DEFG"\nteam_id = "TEAM123456"\n')
    code, lines = await worker(tmp_path, "--config", str(settings))
    assert code == 2
    # The start is said, then why it cannot go on.
    assert lines[-1].startswith(f"evapi-worker: config error: push.apns.key_file: '{key}' {meaning}"), lines
    assert len(lines) == 2 and "level=info" in lines[0] and "starting" in lines[0], lines


@pytest.mark.parametrize(("kind", "meaning"), KINDS)
async def test_an_odd_settings_file_is_one_config_error(tmp_path: Path, kind: str, meaning: str) -> None:
    settings = tmp_path / "worker.toml"
    odd(settings, kind)
    code, lines = await worker(tmp_path, "--config", str(settings))
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith(f"evapi-worker: config error: {settings}: {meaning}"), lines
