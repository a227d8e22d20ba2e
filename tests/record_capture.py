"""Record tests/data/story.evcap from real Kamailio and SIPp phones.

    .venv/bin/python -m tests.record_capture

Three calls: one answered on a desk phone with an iPhone registering late,
one missed with a late iPhone, one where the iPhone wakes while it rings.
The capture and the worker's own decisions (tests/data/story.expected.jsonl)
are written; the replay tests check that replay decides the same.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from pathlib import Path

import trio

from evapi_worker.capture import CaptureSettings
from evapi_worker.config import Config, EvapiSettings
from evapi_worker.core.links import NodeAddress
from evapi_worker.lab.demo import start_watched_worker
from evapi_worker.lab.kamailio_process import KamailioProcess
from evapi_worker.lab.phones import DESK_UA, IPHONE_UA, Phones
from evapi_worker.replay import decision_json

from .sipp_device import free_port, free_sip_port

DATA = Path(__file__).parent / "data"
HOST = "127.0.0.1"
DOMAIN = "voip.example.org"


async def record() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sip_port, evapi_port = free_sip_port(), free_port(socket.SOCK_STREAM)
        kam = KamailioProcess(HOST, sip_port, HOST, evapi_port, "story", HOST, folder, domain=DOMAIN)
        node = NodeAddress("story", HOST, evapi_port, HOST, sip_port)
        capture = CaptureSettings(folder / "capture")
        config = Config(nodes=(node,), evapi=EvapiSettings(reconnect_initial=0.01, reconnect_max=0.1), capture=capture)
        phones = Phones(HOST, sip_port, folder, DOMAIN)
        async with kam.running(), trio.open_nursery() as nursery:
            service, watch = await start_watched_worker(nursery, config)
            for user, desk, call_id, iphone_delay in (
                ("bob", "phone_answers", "story-answered@127.0.0.1", None),
                ("carol", "phone_rings", "story-missed@127.0.0.1", None),
                ("dave", "phone_rings", "story-ringing@127.0.0.1", 1.0),
            ):
                async with trio.open_nursery() as story:
                    story.start_soon(phones.phone, user, DESK_UA, "desk", desk, 6000, folder / "desk.log")
                    await trio.sleep(0.5)
                    if iphone_delay is None:
                        await phones.call("alice", "Alice", user, call_id)
                        story.start_soon(phones.phone, user, IPHONE_UA, "iphone", "phone_rings", 2500, folder / "i.log")
                    else:
                        story.start_soon(phones.call, "alice", "Alice", user, call_id)
                        await trio.sleep(iphone_delay)
                        story.start_soon(phones.phone, user, IPHONE_UA, "iphone", "phone_rings", 3000, folder / "i.log")
            # An iPhone that was awake rang with the real call, which was
            # missed; the app re-registers a moment later: nothing more.
            async with trio.open_nursery() as story:
                story.start_soon(phones.phone, "erin", IPHONE_UA, "iphone", "phone_rings", 5000, folder / "e.log")
                await trio.sleep(0.5)
                await phones.call("alice", "Alice", "erin", "story-rang@127.0.0.1")
                story.start_soon(phones.phone, "erin", IPHONE_UA, "iphone", "phone_rings", 1500, folder / "e2.log")
            await trio.sleep(1)
            nursery.cancel_scope.cancel()
        (file,) = sorted((folder / "capture").iterdir())
        DATA.mkdir(exist_ok=True)
        shutil.copy(file, DATA / "story.evcap")
        lines = [decision_json(d) for d in watch.decisions]
        (DATA / "story.expected.jsonl").write_text("".join(line + "\n" for line in lines))
        print(f"{len(lines)} decisions, {service.metrics.value('evapi_worker_capture_records_total')} records")


if __name__ == "__main__":
    trio.run(record)
