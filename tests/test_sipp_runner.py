"""The SIPp runner with real SIPp, against a real SIPp UAS playing the device."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import trio

from evapi_worker import sip_values
from evapi_worker.sipp_runner import (
    Outcome,
    RunResult,
    SippJob,
    SippRunner,
    SippSettings,
    bundled_scenario,
    remove_stale_folders,
)

from .sipp_device import device, fake_sipp, needs_sipp

pytestmark = needs_sipp


def job(port: int, reason: str = "answered", call_id: str = "orig-%41-call@10.0.0.1") -> SippJob:
    fields = ["bob", "example.com", "alice", "example.org", sip_values.display_name('Alice "A"'), "pin123", reason]
    return SippJob(sip_values.call_id_format(call_id), sip_values.csv_line(fields), "127.0.0.1", port)


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_bundled_scenario_ships_with_the_package() -> None:
    assert bundled_scenario().is_file()


async def call_device(scenario: str, folder: Path, reason: str = "answered") -> tuple[RunResult, list[str]]:
    """One fake call from the runner to a SIPp phone; its outcome and what the phone logged."""
    runner = SippRunner(SippSettings())
    async with device(scenario, folder) as dev:
        with trio.fail_after(20):
            async with runner.limiter:
                result = await runner.run(job(dev.port, reason))
            if scenario != "device_silent":
                await dev.finished()
    return result, dev.lines()


@pytest.mark.parametrize(
    ("reason", "header"),
    [
        ("answered", 'reason= SIP;cause=200;text="Call completed elsewhere"'),
        ("declined", 'reason= SIP;cause=600;text="Busy Everywhere"'),
        ("missed", "reason="),
    ],
)
async def test_device_rings_and_gets_the_cancel_with_the_reason(
    tmp_path: Path, private_tmp: Path, reason: str, header: str
) -> None:
    result, lines = await call_device("phone_rings", tmp_path, reason)
    assert result.outcome is Outcome.COMPLETED, result
    # The original Call-ID, '%' included, and the caller's name and user.
    assert lines[0].startswith(
        'invite call_id= orig-%41-call@10.0.0.1 from= "Alice \\"A\\"" <sip:alice@example.org>;tag='
    )
    assert lines[1] == f"cancel call_id= orig-%41-call@10.0.0.1 {header}".rstrip()
    assert list(private_tmp.iterdir()) == []  # the CSV and logs are gone


async def test_device_answering_gets_ack_and_bye(tmp_path: Path) -> None:
    result, lines = await call_device("device_answers", tmp_path)
    assert result.outcome is Outcome.ANSWERED
    assert lines[1:] == ["ack", "bye"]


async def test_device_rejecting_gets_the_ack(tmp_path: Path) -> None:
    result, lines = await call_device("device_rejects", tmp_path)
    assert result.outcome is Outcome.REJECTED
    assert lines[1:] == ["ack"]


async def test_proxy_trying_then_silence_cancels_after_the_ring_wait(tmp_path: Path) -> None:
    result, lines = await call_device("device_trying_only", tmp_path)
    assert result.outcome is Outcome.TIMEOUT
    assert result.duration >= 6
    assert lines[1].startswith("cancel")


async def test_silent_device_ends_with_no_response(tmp_path: Path) -> None:
    result, _ = await call_device("device_silent", tmp_path)
    assert result.outcome is Outcome.NO_RESPONSE
    assert 6 <= result.duration < 10


async def test_sipp_past_its_time_limit_is_killed_with_its_children(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    fake = fake_sipp(tmp_path, f"sleep 60 &\necho $! > {pidfile}\nsleep 60")
    runner = SippRunner(SippSettings(binary=str(fake), timeout=0.5))
    with trio.fail_after(10):
        async with runner.limiter:
            result = await runner.run(job(5060))
    assert result.outcome is Outcome.KILLED
    child = int(pidfile.read_text())
    with trio.fail_after(5):
        while _alive(child):
            await trio.sleep(0.02)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose; it only waits for init to reap it.
    status = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    return status != "Z"


async def test_missing_sipp_is_a_failed_outcome(tmp_path: Path) -> None:
    runner = SippRunner(SippSettings(binary=str(tmp_path / "no-such-sipp")))
    async with runner.limiter:
        result = await runner.run(job(5060))
    assert result.outcome is Outcome.FAILED
    assert "cannot start SIPp" in result.detail


async def test_sipp_failing_without_an_outcome_reports_its_exit_code(tmp_path: Path) -> None:
    fake = fake_sipp(tmp_path, "echo 'bad things' >&2\nexit 255")
    runner = SippRunner(SippSettings(binary=str(fake)))
    async with runner.limiter:
        result = await runner.run(job(5060))
    assert (result.outcome, result.returncode) == (Outcome.FAILED, 255)
    assert "fatal error" in result.detail and "bad things" in result.detail


async def test_port_pool_gives_each_run_its_own_port(tmp_path: Path) -> None:
    args_file = tmp_path / "args"
    fake = fake_sipp(tmp_path, f'echo "$@" >> {args_file}\nsleep 0.2')
    runner = SippRunner(SippSettings(binary=str(fake), port_base=40000, max_concurrent=3))

    async def one() -> None:
        async with runner.limiter:
            await runner.run(job(5060))

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(one)
    ports = sorted(line.split("-p ")[1].split()[0] for line in args_file.read_text().splitlines())
    assert ports == ["40000", "40001", "40002"]
    assert "-cid_str orig-%%41-call@10.0.0.1" in args_file.read_text()


async def test_stray_responses_from_the_device_do_not_end_the_fake_call(tmp_path: Path) -> None:
    # Answers to a transaction the fake call never started, as when two fake
    # calls' answers cross: ignored, and the call still ends as it should.
    result, lines = await call_device("device_stray", tmp_path)
    assert result.outcome is Outcome.COMPLETED, result
    assert lines[1:] == ["cancel"]


async def test_no_temporary_folder_is_a_failed_run_not_an_exception(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "gone"))  # cannot make its folder
    runner = SippRunner(SippSettings(binary=str(fake_sipp(tmp_path, "exit 0"))))
    async with runner.limiter:
        result = await runner.run(job(5999))
    assert result.outcome is Outcome.FAILED
    assert "cannot prepare SIPp" in result.detail


def test_folders_of_killed_workers_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    gone_pid = os.getpid() + 1_000_000  # beyond pid_max: no such process
    stale = tmp_path / f"evapi-worker-sipp-{gone_pid}-abc"
    mine = tmp_path / f"evapi-worker-sipp-{os.getpid()}-def"
    other = tmp_path / "unrelated"
    for folder in (stale, mine, other):
        folder.mkdir()
        (folder / "call.csv").write_text("SEQUENTIAL\nsecret-pin;\n")
    assert remove_stale_folders(tmp_path) == 1
    assert not stale.exists() and mine.exists() and other.exists()


def test_sipp_gets_ipv6_addresses_in_brackets(tmp_path: Path) -> None:
    runner = SippRunner(SippSettings(local_ip="::1"))
    args = runner.command(SippJob("c%%1", "a;b;\n", "::1", 5060), tmp_path, 40000)
    assert args[1] == "[::1]:5060"
    assert args[args.index("-i") + 1] == "::1"
    v4 = SippRunner(SippSettings()).command(SippJob("c%%1", "a;b;\n", "127.0.0.1", 5060), tmp_path, 40000)
    assert v4[1] == "127.0.0.1:5060"
