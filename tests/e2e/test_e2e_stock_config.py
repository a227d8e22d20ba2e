"""Beside an operator's own Kamailio: Debian's stock kamailio.cfg (the file
the kamailio package installs), with kamailio/examples/debian-stock.patch
applied as shipped and the drop-ins copied beside it as the guide says, with
WITH_NAT and without. Real Kamailio, the real worker, real SIPp phones and
callers; accounts are user@voip.example.org on a node at 127.0.0.1.

The stories: answered, declined and missed elsewhere (the late iPhone gets
the original Call-ID and the CANCEL's Reason), and a call held while the
push wakes the phone, which registers in time and completes the dialog
(ACK, re-INVITE both ways, BYE)."""

from __future__ import annotations

import hashlib
import re
import shutil
import socket
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import trio

from evapi_worker.bundled import bundled, copy_kamailio_files
from evapi_worker.config import PushSettings, config_from
from evapi_worker.core.outcomes import Outcome
from evapi_worker.lab.kamailio_process import KamailioProcess
from evapi_worker.lab.phones import IPHONE_UA, received

from ..e2e_platform import DOMAIN, HOST, Platform, late_iphone, needs_platform, platform, raw_register
from ..sipp_device import GIVES_UP, PHONES, SCENARIOS, free_port, free_sip_port
from .test_e2e_dialogs import assert_complete, woken_in_time

pytestmark = needs_platform

STOCK = Path("/etc/kamailio/kamailio.cfg")
PATCH = bundled("kamailio", "examples", "debian-stock.patch")
ANSWERED = 'SIP;cause=200;text="Call completed elsewhere"'
DECLINED = 'SIP;cause=600;text="Busy Everywhere"'


def _stock_problem() -> str | None:
    """Why the stock file cannot be used here, or None."""
    if shutil.which("kamailio") is None or shutil.which("patch") is None:
        return "needs kamailio and patch"
    if not STOCK.is_file():
        return f"needs the kamailio package's {STOCK}"
    conffiles = subprocess.run(
        ["dpkg-query", "-W", "-f=${Conffiles}", "kamailio"], capture_output=True, text=True, check=False
    ).stdout
    shipped = {line.split()[0]: line.split()[1] for line in conffiles.splitlines() if len(line.split()) >= 2}
    if shipped.get(str(STOCK)) != hashlib.md5(STOCK.read_bytes()).hexdigest():
        return f"{STOCK} was edited on this machine: the test needs the package's own"
    return None


needs_stock = pytest.mark.skipif(_stock_problem() is not None, reason=_stock_problem() or "")


@dataclass
class StockKamailio(KamailioProcess):
    """Kamailio running the patched stock config from its folder, the
    drop-ins beside it (``evapi-worker kamailio-files``)."""

    nat: bool = False

    async def _prepare(self) -> None:
        copy_kamailio_files(self.folder)
        patched = self.folder / "kamailio.cfg"
        result = await trio.run_process(
            ["patch", "--quiet", "-o", str(patched), str(STOCK), str(PATCH)], capture_stdout=True, capture_stderr=True,
            check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr

    def command(self) -> list[str]:
        cmd = [
            *self.run_in_folder(self.folder / "kamailio.cfg"),
            "-l", f"udp:{self.sip_host}:{self.sip_port}", "-l", f"tcp:{self.sip_host}:{self.sip_port}",
            f"--alias={self.domain}",
            "-A", f'EVW_NODE="{self.node}"', "-A", f'EVW_EVAPI_ADDR="{self.evapi_host}:{self.evapi_port}"',
        ]  # fmt: skip
        if self.nat:
            cmd += ["-A", "WITH_NAT"]
        for define in self.defines:
            cmd += ["-A", define]
        return cmd


@asynccontextmanager
async def stock_platform(
    tmp_path: Path, *, nat: bool, hold_anyone: bool = True, push: PushSettings | None = None
) -> AsyncIterator[Platform]:
    sip_port, evapi_port = free_sip_port(), free_port(socket.SOCK_STREAM)
    defines = ("EVW_HOLD_ANYONE",) if hold_anyone else ()
    kam = StockKamailio(
        HOST, sip_port, HOST, evapi_port, "e2e", HOST, tmp_path, domain=DOMAIN, nat=nat, defines=defines
    )
    async with platform(tmp_path, kamailio=kam, push=push) as p:
        yield p


def test_the_patch_applies_to_the_stock_file_as_shipped(tmp_path: Path) -> None:
    problem = _stock_problem()
    if problem is not None:
        pytest.skip(problem)
    out = tmp_path / "kamailio.cfg"
    subprocess.run(["patch", "--quiet", "-o", str(out), str(STOCK), str(PATCH)], check=True)
    copy_kamailio_files(tmp_path)
    for nat in ([], ["-A", "WITH_NAT"]):
        result = subprocess.run(
            ["kamailio", "-c", "-f", str(out), *nat], capture_output=True, text=True, timeout=30, check=False
        )
        assert result.returncode == 0, result.stderr[-2000:]
    added = [line for line in PATCH.read_text().splitlines() if line.startswith("+") and not line.startswith("+++")]
    assert len(added) <= 70, len(added)  # as few edits as an operator can read


@needs_stock
@pytest.mark.parametrize("nat", [False, True], ids=["plain", "with-nat"])
async def test_answered_declined_and_missed_elsewhere_on_the_stock_config(tmp_path: Path, nat: bool) -> None:
    async with stock_platform(tmp_path, nat=nat) as p:
        stories: list[tuple[str, str | Path, str | None]] = [
            ("bob", "phone_answers", ANSWERED),
            ("carol", SCENARIOS / "phone_declines.xml", DECLINED),
            ("dave", "phone_rings", None),
        ]
        for user, desk, reason in stories:
            call_id = f"stock-{user}-{nat}@caller.example.net"
            outcome, iphone = await late_iphone(p, user, desk, call_id)
            assert outcome is Outcome.COMPLETED, (user, outcome, p.kamailio.tail())
            assert received(iphone) == (call_id, reason), user
            [invite] = [line for line in iphone.read_text().splitlines() if line.startswith("invite ")]
            assert f"to= <sip:{user}@{DOMAIN}>" in invite, invite  # the SIP domain, with use_domain 0
        assert [d.reason for d in p.watch.decisions] == ["answered", "declined", "missed"]


@needs_stock
@pytest.mark.parametrize("nat", [False, True], ids=["plain", "with-nat"])
async def test_a_held_call_woken_in_time_completes_its_dialog_on_the_stock_config(tmp_path: Path, nat: bool) -> None:
    async with stock_platform(tmp_path, nat=nat) as p:
        call_id = f"stock-held-{nat}@caller.example.net"
        d = await woken_in_time(p, "kate", call_id, forked=False)
        assert_complete(d, call_id, phone_hangs_up=False)
        assert [(x.action.value, x.reason) for x in p.watch.decisions] == [("none", "ringing")]


@needs_stock
async def test_a_held_call_cancelled_at_once_leaves_no_warning_and_its_late_iphone_gets_the_fake_call(
    tmp_path: Path,
) -> None:
    """The caller gives up as soon as it hears the held call ring (its
    CANCEL races the hold in another Kamailio process); the iPhone wakes
    after: the fake call, and not a WARNING in Kamailio's log (no resume
    of a transaction that is gone)."""
    async with stock_platform(tmp_path, nat=False) as p:
        call_id = "stock-held-cancelled@caller.example.net"
        assert await p.phones.call("alice", "Alice", "wes", call_id, GIVES_UP, timeout=20) == 0
        iphone = tmp_path / "iphone.log"
        await p.phones.phone("wes", IPHONE_UA, "iphone", "phone_rings", 2500, iphone)
        assert await p.watch.outcome(call_id, timeout=5) is Outcome.COMPLETED
        assert received(iphone) == (call_id, None)
        await trio.sleep(0.5)
    noisy = [
        line for line in p.kamailio.log.read_text(errors="replace").splitlines()
        if re.search(r"\b(ERROR|WARNING|CRITICAL|BUG)\b", line)
    ]  # fmt: skip
    assert noisy == []


@needs_stock
async def test_the_stock_config_holds_only_push_accounts_and_answers_rfc_8599(tmp_path: Path) -> None:
    """As shipped: a REGISTER naming a push service the workers push to
    gets it echoed in Feature-Caps, another 555; a call to an account that
    never registered a push device gets the stock no-contact answer at once;
    one whose iPhone registered once is held, and the iPhone waking late
    gets the fake call."""
    async with stock_platform(tmp_path, nat=False, hold_anyone=False) as p:
        assert p.kamailio is not None
        port = p.kamailio.sip_port
        params = "pn-prid={}:voip;pn-param=TEAM123456.org.linphone.phone.voip".format("ab" * 32)
        code, reply = await trio.to_thread.run_sync(
            raw_register, HOST, port, "nina", DOMAIN, f"pn-provider=apns;{params}"
        )
        assert code == 200 and 'Feature-Caps: *;+sip.pns="apns"' in reply, reply
        code, reply = await trio.to_thread.run_sync(
            raw_register, HOST, port, "nina", DOMAIN, f"pn-provider=mpns;{params}"
        )
        assert code == 555 and "Feature-Caps" not in reply, reply
        started = trio.current_time()
        await p.phones.call("alice", "Alice", "gina", "stock-unknown@caller.example.net")
        assert trio.current_time() - started < 1.0
        assert p.metric("evapi_worker_events_total", node="e2e", type="call_start") == 0
        await p.phones.phone("hank", IPHONE_UA, "iphone", "phone_rings", 200, tmp_path / "first.log")
        call_id = "stock-known@caller.example.net"
        assert await p.phones.call("alice", "Alice", "hank", call_id, GIVES_UP, timeout=20) == 0
        assert p.metric("evapi_worker_events_total", node="e2e", type="call_start") == 1
        late = tmp_path / "late.log"
        await p.phones.phone("hank", IPHONE_UA, "iphone", "phone_rings", 2000, late)
        assert received(late) == (call_id, None)


@needs_stock
async def test_push_standin_rehearses_the_push_beside_the_stock_config(tmp_path: Path) -> None:
    """An operator's rehearsal: `evapi-worker push standin` serves the
    stand-ins and prints the settings; the worker pushes through them for a
    call on the stock config; the stand-in prints the push; the iPhone it
    woke (after its caller gave up) gets the fake call."""
    token = "c0ffee" * 10 + "abcd"
    worker = str(Path(sys.executable).with_name("evapi-worker"))
    standin = await trio.lowlevel.open_process(
        [worker, "push", "standin", "--dir", str(tmp_path / "standin")], stdout=subprocess.PIPE
    )
    try:
        assert standin.stdout is not None
        out = TextReceiver(standin.stdout)
        settings = await out.until("# Each push received")
        push = config_from(tomllib.loads(settings)).push
        async with stock_platform(tmp_path, nat=False, push=push) as p:
            await p.phones.phone("olga", IPHONE_UA, token, "phone_rings", 300, tmp_path / "asleep.log",
                                 register=PHONES / "iphone_push_sleeps.xml")  # fmt: skip
            with trio.fail_after(5):
                while p.metric("evapi_worker_push_devices") < 1:
                    await trio.sleep(0.05)
            call_id = "stock-standin@caller.example.net"
            async with trio.open_nursery() as calls:
                # The sleeping contact never answers the INVITE, so tm keeps
                # the branch after the CANCEL (RFC 3261 9.1) and the caller's
                # 487 comes at the stock fr_timer, 30 s on: the caller runs
                # beside the story, which goes on once its CANCEL was heard.
                calls.start_soon(partial(p.phones.call, "alice", "Alice", "olga", call_id, GIVES_UP, timeout=40))
                pushed = await out.until("\n")
                assert pushed.startswith(f"push apns token={token} topic=org.linphone.phone.voip call_id={call_id} ")
                with trio.fail_after(10):
                    while p.metric("evapi_worker_events_total", node="e2e", type="call_cancelled") < 1:
                        await trio.sleep(0.05)
                iphone = tmp_path / "iphone.log"
                await p.phones.phone("olga", IPHONE_UA, token, "phone_rings", 3000, iphone,
                                     register=PHONES / "iphone_push_register.xml")  # fmt: skip
                assert await p.watch.outcome(call_id, timeout=10) is Outcome.COMPLETED
                assert received(iphone) == (call_id, None)
                calls.cancel_scope.cancel()
    finally:
        standin.terminate()
        with trio.move_on_after(5):
            await standin.wait()


class TextReceiver:
    """Lines from a child's stdout, read until a mark."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buffer = ""

    async def until(self, mark: str) -> str:
        """Everything up to and including the line holding ``mark``."""
        with trio.fail_after(20):
            while True:
                at = self.buffer.find(mark)
                end = self.buffer.find("\n", at + len(mark) - 1) if at >= 0 else -1
                if end >= 0:
                    text, self.buffer = self.buffer[: end + 1], self.buffer[end + 1 :]
                    return text
                data = await self.stream.receive_some(65536)
                if not data:
                    raise EOFError(self.buffer)
                self.buffer += data.decode()
