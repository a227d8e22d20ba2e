"""``kill -9`` of the real ``evapi-worker run``: at most a second of state
lost, and never a fake call twice."""

from __future__ import annotations

import math
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import msgpack
import trio

from ..evapi_server import EvapiServer
from ..sipp_device import alive, fake_runs, fake_sipp, needs_sipp, sipp_children

CALLS = 6


@asynccontextmanager
async def worker(tmp_path: Path, server: EvapiServer, *extra: str) -> AsyncIterator[trio.Process]:
    """The real ``run`` command (``python -m evapi_worker.cli``) against the
    in-test node; killed with SIGKILL (never stopped gracefully) when the
    block ends."""
    fake = fake_sipp(tmp_path)
    args = [
        sys.executable, "-m", "evapi_worker.cli", "run", "--kamailio", f"127.0.0.1:{server.port}",
        "--metrics", "off", "--state", str(tmp_path / "state.msgpack"), "--sipp", str(fake), *extra,
    ]  # fmt: skip
    before = server.accepted
    log = (tmp_path / "worker.log").open("ab")
    proc = await trio.lowlevel.open_process(args, stdout=subprocess.DEVNULL, stderr=log)
    try:
        await server.wait_for(lambda: server.accepted > before and bool(server.streams), timeout=15)
        yield proc
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        log.close()
        await server.wait_for(lambda: not server.streams)


def register(server: EvapiServer, ts: float, i: int) -> bytes:
    return server.event(
        "register", ts, aor=f"bob{i}@x", contact=f"sip:bob{i}@127.0.0.1:{6000 + i}", src_ip="127.0.0.1",
        src_port=6000 + i, proto="udp", expires=600, user_agent="LinphoneiOS/5", instance=f"<urn:uuid:{i}>",
    )  # fmt: skip


async def test_kill_9_loses_at_most_a_second_and_never_repeats_a_fake_call(tmp_path: Path) -> None:
    server = EvapiServer()
    t0 = time.time()
    async with trio.open_nursery() as nursery:
        await server.start(nursery)
        # 1. Six calls end, their iPhones still asleep; the worker dies a
        #    little more than a second later.
        async with worker(tmp_path, server):
            for i in range(CALLS):
                await server.send(
                    server.event("call_start", t0, call_id=f"c{i}", aor=f"bob{i}@x", from_user="alice")
                    + server.event("call_cancelled", t0 + 0.5, call_id=f"c{i}")
                )
            await trio.sleep(1.6)
        # 2. Restarted, it still knows the calls: the iPhones get their fake
        #    calls. The timer writes the journal rarely here, so only the
        #    records each fake call writes before it begins reach the disk
        #    before this worker dies too.
        config = tmp_path / "slow-journal.toml"
        config.write_text("state_interval = 60\n")
        async with worker(tmp_path, server, "--config", str(config)):
            # Stamped now: the fake call's deadline counts from the REGISTER,
            # and a restart (Python compiling a fresh checkout) can take seconds.
            now = time.time()
            await server.send(b"".join(register(server, now, i) for i in range(CALLS)))
            with trio.fail_after(10):
                while len(fake_runs(tmp_path)) < CALLS:
                    await trio.sleep(0.05)
        assert sorted(fake_runs(tmp_path)) == [f"c{i}" for i in range(CALLS)]
        # 3. Restarted again, the same iPhones register again: nothing repeats.
        async with worker(tmp_path, server):
            now = time.time()
            await server.send(b"".join(register(server, now, i) for i in range(CALLS)))
            await trio.sleep(1.5)
        nursery.cancel_scope.cancel()
    assert len(fake_runs(tmp_path)) == CALLS
    log = (tmp_path / "worker.log").read_text()
    assert "actions_begun=6" in log, log


def framed(record: list[object]) -> bytes:
    """One journal record as the worker frames it (a mark, length, CRC-32)."""
    payload: bytes = msgpack.packb(record)
    return b"\xe5EVJ" + struct.pack(">II", len(payload), zlib.crc32(payload)) + payload


async def test_damage_in_the_middle_of_the_journal_costs_only_the_damaged_records(tmp_path: Path) -> None:
    server = EvapiServer()
    t0 = time.time()

    def calls(numbers: range) -> bytes:
        return b"".join(
            server.event("call_start", t0, call_id=f"c{i}", aor=f"bob{i}@x", from_user="alice")
            + server.event("call_cancelled", t0 + 0.5, call_id=f"c{i}")
            for i in numbers
        )

    async with trio.open_nursery() as nursery:
        await server.start(nursery)
        async with worker(tmp_path, server):
            await server.send(calls(range(3)))
            await trio.sleep(1.3)  # journaled
            (journal,) = tmp_path.glob("state.msgpack.journal.*")
            with journal.open("ab") as f:
                # Between the worker's records: bytes that are no record, a
                # record cut short, an event at a NaN time, a clock at infinity.
                f.write(b"\x00\xffgarbage" * 50)
                f.write(framed(["e", []])[:-3] + b"\xe5EV")
                f.write(framed(["e", [["kam1", math.nan, calls(range(9, 10))]]]))
                f.write(framed(["w", math.inf]))
            await server.send(calls(range(3, 6)))
            await trio.sleep(1.3)
        # Restarted: every sound record is restored, the damage counted.
        async with worker(tmp_path, server):
            now = time.time()
            await server.send(b"".join(register(server, now, i) for i in range(CALLS)))
            with trio.fail_after(10):
                while len(fake_runs(tmp_path)) < CALLS:
                    await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert sorted(fake_runs(tmp_path)) == [f"c{i}" for i in range(CALLS)]
    log = (tmp_path / "worker.log").read_text()
    restored = [line for line in log.splitlines() if "state restored" in line][-1]
    assert "journal_events=12" in restored, restored
    # The garbage and the record cut short after it are one damaged stretch
    # (nothing sound between them); the NaN event and the clock at infinity.
    assert "journal_skipped=3" in log, log


def device(server: EvapiServer, ts: float, i: int) -> bytes:
    """A REGISTER of bob's iPhone number ``i``."""
    return server.event(
        "register", ts, aor="bob@x", contact=f"sip:bob@127.0.0.1:{6000 + i}", src_ip="127.0.0.1",
        src_port=6000 + i, proto="udp", expires=600, user_agent="LinphoneiOS/5", instance=f"<urn:uuid:{i}>",
    )  # fmt: skip


@needs_sipp
async def test_kill_9_leaves_no_sipp_behind(tmp_path: Path) -> None:
    # SIPp ignores SIGTERM and would hold its ports for good after its
    # worker died: each is started to die with the worker (PDEATHSIG).
    server = EvapiServer()
    t0 = time.time() - 5  # the call was cancelled before the iPhones woke
    async with trio.open_nursery() as nursery:
        await server.start(nursery)
        async with worker(tmp_path, server, "--sipp", "sipp") as proc:
            # Three devices of one call: three SIPp processes (one Call-ID each).
            await server.send(
                server.event("call_start", t0, call_id="c0", aor="bob@x", from_user="alice")
                + server.event("call_cancelled", t0 + 0.5, call_id="c0")
            )
            now = time.time()
            await server.send(b"".join(device(server, now, i) for i in range(3)))
            with trio.fail_after(15):
                while len(sipps := sipp_children(proc.pid)) < 3:
                    await trio.sleep(0.02)
        # Killed: within two seconds none of its SIPp processes is left.
        with trio.fail_after(2):
            while any(alive(pid) for pid in sipps):
                await trio.sleep(0.02)
        nursery.cancel_scope.cancel()
