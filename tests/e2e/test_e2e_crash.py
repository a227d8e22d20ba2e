"""``kill -9`` of the real ``evapi-worker run`` in the middle of a burst of
late iPhones, with a real Kamailio and real SIPp on both sides: restarted
with its state, the worker gives every iPhone exactly one fake call (the
phones' own logs count them)."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import trio

from evapi_worker.lab.kamailio_process import KamailioProcess

from ..e2e_platform import DOMAIN, HOST, needs_platform
from ..sipp_device import PHONES, SCENARIOS, free_port, free_sip_port

pytestmark = needs_platform

PHONE_RINGS = PHONES / "phone_rings.xml"


async def sipp(folder: Path, name: str, sip_port: int, *args: str) -> trio.Process:
    """A SIPp against the node, its output beside the test's files."""
    command = [
        "sipp", f"{HOST}:{sip_port}", "-i", HOST, "-p", str(free_port()), "-nostdin", "-key", "domain", DOMAIN,
        "-trace_logs", "-log_file", str(folder / f"{name}.log"), "-trace_err", "-error_file",
        str(folder / f"{name}.errors"), *args,
    ]  # fmt: skip
    return await trio.lowlevel.open_process(command, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def start_worker(folder: Path, args: list[str], log: Path) -> trio.Process:
    before = log.read_text().count("evapi connected") if log.exists() else 0
    with log.open("ab") as sink:
        proc = await trio.lowlevel.open_process(args, stdout=subprocess.DEVNULL, stderr=sink, cwd=folder)
    with trio.fail_after(15):
        while log.read_text().count("evapi connected") == before:
            assert proc.returncode is None, log.read_text()
            await trio.sleep(0.05)
    return proc


async def test_kill_9_in_a_burst_of_late_iphones_gives_each_exactly_one_fake_call(tmp_path: Path) -> None:
    burst = 50
    sip_port, evapi_port = free_sip_port(), free_port(socket.SOCK_STREAM)
    # Its accounts' calls are held though their iPhones never registered before.
    kamailio = KamailioProcess(
        HOST, sip_port, HOST, evapi_port, "e2e", HOST, tmp_path, domain=DOMAIN, defines=("EVW_HOLD_ANYONE",)
    )
    # Call n (SIPp's call number, from 1) is to late<n>, Call-ID burst-late<n>.
    users = [f"late{n}" for n in range(1, burst + 1)]
    call_ids = sorted(f"burst-{u}@caller.example.net" for u in users)
    (tmp_path / "calls.csv").write_text("SEQUENTIAL\n" + "".join(f"{u};\n" for u in users))
    (tmp_path / "iphones.csv").write_text("SEQUENTIAL\n" + "".join(f"{u};\n" for u in users))
    # Fake calls run eight at a time (the default): most of the burst waits
    # for a SIPp slot when the worker dies.
    (tmp_path / "worker.toml").write_text("[engine]\ndeadline = 10\n")
    log = tmp_path / "worker.log"
    node = f"e2e=127.0.0.1:{evapi_port},sip={HOST}:{sip_port}"
    args = [
        sys.executable, "-m", "evapi_worker.cli", "run", "--kamailio", node,
        "--metrics", "off", "--state", str(tmp_path / "state"), "--config", str(tmp_path / "worker.toml"),
    ]  # fmt: skip
    async with kamailio.running():
        worker = await start_worker(tmp_path, args, log)
        try:
            # 50 calls, each held for its callee's push and given up.
            callers = await sipp(
                tmp_path, "callers", sip_port, "-sf", str(SCENARIOS / "callers_cancel.xml"),
                "-inf", str(tmp_path / "calls.csv"), "-m", str(burst), "-r", "100", "-l", str(burst),
                "-timeout", "30", "-cid_str", "burst-late%u@caller.example.net",
            )  # fmt: skip
            assert await callers.wait() == 0, (tmp_path / "callers.errors").read_text(errors="replace")
            await trio.sleep(0.5)
            # Then all 50 iPhones register at once; 150 ms later the worker dies.
            iphones = await sipp(
                tmp_path, "iphones", sip_port, "-sf", str(SCENARIOS / "iphones_register.xml"),
                "-oocsf", str(PHONE_RINGS), "-inf", str(tmp_path / "iphones.csv"), "-m", str(burst),
                "-r", "1000", "-l", str(burst), "-d", "12000", "-timeout", "40",
            )  # fmt: skip
            await trio.sleep(0.15)
            worker.send_signal(signal.SIGKILL)
            await worker.wait()
            worker = await start_worker(tmp_path, args, log)
            with trio.fail_after(40):
                await iphones.wait()
        finally:
            worker.send_signal(signal.SIGKILL)
            await worker.wait()
    invites = re.findall(r"invite call_id=\s*(\S+)", (tmp_path / "iphones.log").read_text(errors="replace"))
    worker_log = log.read_text()
    assert sorted(invites) == call_ids, worker_log[-3000:]
    assert "state restored" in worker_log
