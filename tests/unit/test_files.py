"""Files opened as what they must be (files.py), on a real file system."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from evapi_worker.files import FileProblem, check_private_folder, open_regular, read_regular

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="making device nodes and files of other users needs root")


def test_a_regular_file_is_read_and_one_too_large_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    assert read_regular(path, 100) == b"x" * 100
    with pytest.raises(FileProblem, match="holds 100 bytes, more than the 99"):
        read_regular(path, 99)


@pytest.mark.parametrize("kind", ["fifo", "folder", "link", "link to /dev/zero", "socket"])
def test_what_is_not_a_regular_file_is_one_clear_error_and_never_a_hang(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "odd"
    if kind == "fifo":
        os.mkfifo(path)  # opened for reading, it would wait for a writer for ever
    elif kind == "folder":
        path.mkdir()
    elif kind == "link":
        (tmp_path / "target").write_bytes(b"x")
        path.symlink_to(tmp_path / "target")
    elif kind == "link to /dev/zero":
        path.symlink_to("/dev/zero")
    else:
        import socket

        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(path))
    expected = {"fifo": "a FIFO", "folder": "a folder", "socket": "not a regular file"}.get(kind, "a symbolic link")
    with pytest.raises(FileProblem, match=expected):
        read_regular(path, 1 << 20)
    if kind == "fifo":  # and for writing, with no reader
        with pytest.raises(FileProblem, match="a FIFO"):
            open_regular(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)


@needs_root
def test_a_device_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "zero"
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 5))  # what /dev/zero is
    with pytest.raises(FileProblem, match="a character device"):
        read_regular(path, 1 << 20)


@needs_root
def test_a_file_of_another_user_is_refused_where_it_must_be_ours(tmp_path: Path) -> None:
    path = tmp_path / "theirs"
    path.write_bytes(b"x")
    os.chown(path, 12345, 12345)
    assert read_regular(path, 10) == b"x"
    with pytest.raises(FileProblem, match="belongs to user 12345"):
        read_regular(path, 10, own=True)


def test_a_link_planted_where_a_new_file_goes_is_never_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    (tmp_path / "new").symlink_to(victim)
    with pytest.raises(FileProblem, match="a symbolic link"):
        open_regular(tmp_path / "new", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    with pytest.raises(FileExistsError):
        open_regular(tmp_path / "new", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    assert victim.read_bytes() == b"keep"


def test_a_folder_others_can_write_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "state"
    folder.mkdir(mode=0o700)
    check_private_folder(folder, "the state")
    for mode in (0o777, 0o1777, 0o770):
        folder.chmod(mode)
        with pytest.raises(FileProblem, match="can be written by other users"):
            check_private_folder(folder, "the state")
    folder.chmod(0o755)
    check_private_folder(folder, "the state")
    with pytest.raises(FileProblem, match="does not exist"):
        check_private_folder(tmp_path / "none", "the state")
