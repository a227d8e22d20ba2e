"""The SIPp runner with real SIPp, against a real SIPp UAS playing the
device; and its handling of processes with a stand-in SIPp."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio

from evapi_worker.children import PID_FILE, start_time
from evapi_worker.core import sip_values
from evapi_worker.core.outcomes import Outcome
from evapi_worker.net import free_port
from evapi_worker.sipp_runner import (
    RunResult,
    SippJob,
    SippRunner,
    SippSettings,
    bundled_scenario,
    remove_stale_folders,
)

from ..sipp_device import alive, device, fake_runs, fake_sipp, fake_starts, needs_sipp, sipp_children

pytestmark = needs_sipp


def job(port: int, reason: str = "answered", call_id: str = "orig-%41-call@10.0.0.1", callee: str = "bob") -> SippJob:
    fields = (callee, "example.com", "alice", "example.org", "pin123", reason)
    return SippJob(sip_values.call_id(call_id), fields, sip_values.display_name('Alice; "A"'), "127.0.0.1", port)


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@asynccontextmanager
async def serving(settings: SippSettings) -> AsyncIterator[SippRunner]:
    runner = SippRunner(settings)
    async with trio.open_nursery() as nursery:
        await nursery.start(runner.serve)
        yield runner
        nursery.cancel_scope.cancel()


async def run(runner: SippRunner, one: SippJob, account: str = "bob@example.com") -> RunResult:
    await runner.slots.acquire(account)
    try:
        return await runner.run(one)
    finally:
        runner.slots.release(account)


def test_bundled_scenario_ships_with_the_package() -> None:
    assert bundled_scenario().is_file()


async def call_device(scenario: str, folder: Path, reason: str = "answered") -> tuple[RunResult, list[str]]:
    """One fake call from the runner to a SIPp phone; its outcome and what the phone logged."""
    async with serving(SippSettings()) as runner, device(scenario, folder) as dev:
        with trio.fail_after(20):
            result = await run(runner, job(dev.port, reason))
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
        'invite call_id= orig-%41-call@10.0.0.1 from= "Alice; \\"A\\"" <sip:alice@example.org>;tag='
    )
    assert lines[1] == f"cancel call_id= orig-%41-call@10.0.0.1 {header}".rstrip()
    assert list(private_tmp.iterdir()) == []  # the process's folder is gone with it


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
    # SIPp's own timer ended it (not the worker's time limit, which kills).
    assert result.outcome is Outcome.NO_RESPONSE
    assert result.duration >= 6


async def test_a_call_that_went_wrong_says_what_its_outcome_means(tmp_path: Path) -> None:
    fake = fake_sipp(tmp_path, "--outcome", "unreachable")
    async with serving(SippSettings(binary=str(fake))) as runner:
        result = await run(runner, job(5060))
    assert result.outcome is Outcome.UNREACHABLE
    assert "477" in result.detail and "shared memory" in result.detail, result


async def test_many_fake_calls_share_one_sipp_process_each_with_its_own_call_id(tmp_path: Path) -> None:
    calls = 60
    async with serving(SippSettings()) as runner, device("phone_rings", tmp_path, calls=calls) as dev:
        results: dict[int, RunResult] = {}

        async def one(n: int) -> None:
            results[n] = await run(runner, job(dev.port, "missed", f"burst-{n}@caller", f"u{n}"), f"u{n}@example.com")

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for n in range(calls):
                    nursery.start_soon(one, n)
            await dev.finished()
        assert runner.processes == 1
    assert {r.outcome for r in results.values()} == {Outcome.COMPLETED}
    invites = sorted(line.split()[2] for line in dev.lines() if line.startswith("invite"))
    assert invites == sorted(f"burst-{n}@caller" for n in range(calls))


async def test_devices_of_one_call_run_in_separate_processes_at_once(tmp_path: Path) -> None:
    fake = fake_sipp(tmp_path, "--delay", "0.3")
    async with serving(SippSettings(binary=str(fake), processes=3)) as runner:
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            for n in range(5):  # five devices of one call, three processes at most
                nursery.start_soon(run, runner, job(5060, callee=f"dev{n}"), "bob@example.com")
        took = trio.current_time() - started
        assert runner.processes == 3
    assert fake_runs(tmp_path) == ["orig-%41-call@10.0.0.1"] * 5
    # Three processes for five devices of one call: three at once, then the
    # last two (each needs a process the call is not in yet).
    assert len(fake_starts(tmp_path)) == 3
    assert took >= 0.6


async def test_a_device_of_a_call_waits_for_a_free_process_no_later_than_its_deadline(tmp_path: Path) -> None:
    fake = fake_sipp(tmp_path, "--delay", "0.5")
    async with serving(SippSettings(binary=str(fake), processes=1)) as runner:
        first = await runner.reserve(job(5060, callee="dev0"))
        assert first is not None
        now = trio.current_time()
        assert await runner.reserve(job(5060, callee="dev1"), now + 0.2) is None  # the one process holds the call
        assert trio.current_time() - now >= 0.2
        assert fake_runs(tmp_path) == []  # given up at its deadline, while the first call still held the process
        async with trio.open_nursery() as nursery:
            nursery.start_soon(runner.run, job(5060, callee="dev0"), first)
            second = await runner.reserve(job(5060, callee="dev1"), trio.current_time() + 5)
            assert second is not None  # given as soon as the first call ended
            assert trio.current_time() - now >= 0.5
            runner.release(second)
    assert fake_runs(tmp_path) == ["orig-%41-call@10.0.0.1"]


async def test_a_call_past_its_time_limit_is_aborted_and_its_process_serves_the_next(tmp_path: Path) -> None:
    fake = fake_sipp(tmp_path, "--silent")
    async with serving(SippSettings(binary=str(fake), timeout=0.5)) as runner:
        result = await run(runner, job(5060))
        assert result.outcome is Outcome.KILLED and result.duration >= 0.5  # killed at its limit, not before
        with trio.fail_after(5):
            while "internal-cmd: abort_call" not in (tmp_path / "runs.txt").read_text():
                await trio.sleep(0.02)
        assert (await run(runner, job(5060, call_id="next@x"))).outcome is Outcome.KILLED
        assert len(fake_starts(tmp_path)) == 1  # the same process for both


async def test_a_sipp_that_dies_fails_its_calls_and_a_new_one_serves_the_next(tmp_path: Path) -> None:
    fake = fake_sipp(tmp_path, "--die-after", "1")
    async with serving(SippSettings(binary=str(fake))) as runner:
        result = await run(runner, job(5060))
        assert result.outcome is Outcome.FAILED and "SIPp exited" in result.detail, result
        again = await run(runner, job(5060, call_id="second@x"))
        assert again.outcome is Outcome.FAILED
    assert len(fake_starts(tmp_path)) == 2


async def test_the_runner_stopping_ends_its_sipp_processes(tmp_path: Path) -> None:
    fake = fake_sipp(tmp_path, "--delay", "0.05")
    async with serving(SippSettings(binary=str(fake))) as runner:
        assert (await run(runner, job(5060))).outcome is Outcome.COMPLETED
        [(pid, _)] = fake_starts(tmp_path)
        assert alive(pid)
    with trio.fail_after(5):
        while alive(pid):
            await trio.sleep(0.02)


async def test_missing_sipp_is_a_failed_outcome(tmp_path: Path) -> None:
    async with serving(SippSettings(binary=str(tmp_path / "no-such-sipp"))) as runner:
        result = await run(runner, job(5999))
    assert result.outcome is Outcome.FAILED
    assert "cannot start SIPp" in result.detail


async def test_sipp_failing_to_start_reports_its_exit_code_and_error(tmp_path: Path) -> None:
    fake = fake_sipp(tmp_path, "--exit", "255", "--say", "bad_things")
    async with serving(SippSettings(binary=str(fake))) as runner:
        result = await run(runner, job(5999))
    assert result.outcome is Outcome.FAILED
    assert "fatal error" in result.detail and "bad_things" in result.detail, result


async def test_port_base_gives_each_process_its_own_port(tmp_path: Path) -> None:
    fake = fake_sipp(tmp_path, "--delay", "0.2")
    settings = SippSettings(binary=str(fake), port_base=40000, processes=3)
    async with serving(settings) as runner, trio.open_nursery() as nursery:
        for n in range(3):
            nursery.start_soon(run, runner, job(5060, callee=f"dev{n}"), "bob@example.com")
    ports = sorted(args.split("-p ")[1].split()[0] for _, args in fake_starts(tmp_path))
    assert ports == ["40000", "40001", "40002"]


async def test_a_port_base_port_another_program_holds_is_skipped_then_tried_again(tmp_path: Path) -> None:
    fake = fake_sipp(tmp_path, "--bind", "--die-after", "1")
    base = free_port("127.0.0.1")
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.bind(("127.0.0.1", base))
    settings = SippSettings(binary=str(fake), port_base=base, processes=1, local_ip="127.0.0.1")
    async with serving(settings) as runner:
        await run(runner, job(5060))  # its SIPp takes the next port, and dies
        holder.close()  # the other program let the port go
        await run(runner, job(5060, call_id="second@x"))
    ports = [int(args.split("-p ")[1].split()[0]) for _, args in fake_starts(tmp_path)]
    assert ports == [base, base + 1, base]  # not marked used forever after one failed start


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
    async with serving(SippSettings(binary=str(fake_sipp(tmp_path)))) as runner:
        result = await run(runner, job(5999))
    assert result.outcome is Outcome.FAILED
    assert "cannot prepare SIPp" in result.detail


def test_folders_of_killed_workers_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    gone_pid = os.getpid() + 1_000_000  # beyond pid_max: no such process
    stale = tmp_path / f"evapi-worker-sipp-{gone_pid}-abc"
    mine = tmp_path / f"evapi-worker-sipp-{os.getpid()}-def"
    other = tmp_path / "unrelated"
    for folder in (stale, mine, other):
        folder.mkdir()
        (folder / "errors.log").write_text("an error\n")
    assert remove_stale_folders(tmp_path) == 1
    assert not stale.exists() and mine.exists() and other.exists()


def test_sipp_gets_ipv6_addresses_in_brackets(tmp_path: Path) -> None:
    runner = SippRunner(SippSettings(local_ip="::1"))
    args = runner.command(("::1", 5060), tmp_path, 40000, 40001, 40002)
    assert args[1] == "[::1]:5060"
    assert args[args.index("-i") + 1] == "::1"
    v4 = SippRunner(SippSettings()).command(("127.0.0.1", 5060), tmp_path, 40000, 40001, 40002)
    assert v4[1] == "127.0.0.1:5060"
    assert v4[v4.index("-3pcc") + 1] == "127.0.0.1:40001"


async def test_a_stranger_never_gets_a_connection_to_the_twin_socket(tmp_path: Path) -> None:
    # SIPp listens for its twin on every address and takes any connection; the
    # worker's filter lets only its own in. A stranger's SYN is dropped, on
    # 127.0.0.1 or any other address: no connection, so no call placed and
    # no fake call's outcome lost; SIPp serves on.
    async with serving(SippSettings()) as runner, device("phone_rings", tmp_path, calls=2) as dev:
        with trio.fail_after(20):
            assert (await run(runner, job(dev.port, "missed", "first@caller"))).outcome is Outcome.COMPLETED
        ((pid, twin_port),) = sipp_children(os.getpid()).items()
        for host in ("127.0.0.1", "127.0.0.2"):
            with pytest.raises(OSError, match="timed out"):
                await trio.to_thread.run_sync(partial(socket.create_connection, (host, twin_port), timeout=1))
        with trio.fail_after(20):
            assert (await run(runner, job(dev.port, "missed", "second@caller"))).outcome is Outcome.COMPLETED
        assert sipp_children(os.getpid()) == {pid: twin_port}  # the same SIPp, never restarted


async def test_the_sipp_a_crashed_worker_left_is_ended_by_its_pid_file_at_the_next_start(tmp_path: Path) -> None:
    gone = os.getpid() + 1_000_000  # the dead worker
    left = await trio.lowlevel.open_process(["sleep", "60"], start_new_session=True)
    stranger = await trio.lowlevel.open_process(["sleep", "60"], start_new_session=True)
    try:
        folder = tmp_path / f"evapi-worker-sipp-{gone}-abc"
        folder.mkdir(mode=0o700)
        (folder / PID_FILE).write_text(f"{left.pid} {start_time(left.pid)}\n")
        # A pid file whose start time is not the process's (its pid was given
        # to another since), and one through a link: that process is left alone.
        reused = tmp_path / f"evapi-worker-sipp-{gone}-def"
        reused.mkdir(mode=0o700)
        (reused / PID_FILE).write_text(f"{stranger.pid} {start_time(stranger.pid) + 1}\n")  # type: ignore[operator]
        linked = tmp_path / f"evapi-worker-sipp-{gone}-ghi"
        linked.mkdir(mode=0o700)
        (tmp_path / "elsewhere").write_text(f"{stranger.pid} {start_time(stranger.pid)}\n")
        (linked / PID_FILE).symlink_to(tmp_path / "elsewhere")
        assert remove_stale_folders(tmp_path) == 3
        with trio.fail_after(5):
            await left.wait()
        assert left.returncode == -9 and stranger.poll() is None
    finally:
        for proc in (left, stranger):
            if proc.poll() is None:
                proc.kill()
                await proc.wait()
