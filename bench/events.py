"""Synthetic Kamailio event streams for the benchmarks."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator

from evapi_worker.core.netstring import encode

UA_IPHONE = "LinphoneiOS/5.2.5 (iPhone; iOS 17.4) LinphoneSDK/5.3.0"
UA_DESK = "Yealink SIP-T46U 108.86.0.45"


def stream(calls: int, node: str = "kam1", seed: int = 1, start: float | None = None) -> list[bytes]:
    """Netstring frames of :func:`payloads`."""
    return [encode(payload) for payload in payloads(calls, node, seed, start)]


def payloads(calls: int, node: str = "kam1", seed: int = 1, start: float | None = None) -> Iterator[bytes]:
    """The JSON events of ``calls`` calls, about five events each, as they
    are made (a day of them does not fit in memory at once).

    Each call: start, a desk phone re-registering, the call's end (answered,
    cancelled or declined), and an iPhone registering late for one in four.
    Timestamps start at ``start`` (now, by default: a worker counts a fake
    call's deadline from the REGISTER's stamp, as Kamailio's are) and
    advance 1 ms per event; sizes match what a jansson-built Kamailio event
    is (160 to 330 bytes).
    """
    rng = random.Random(seed)
    frames: list[bytes] = []  # made by the last call's events, handed out after each call
    seq = 0
    ts = time.time() if start is None else start

    def emit(event: str, **fields: object) -> None:
        nonlocal seq, ts
        seq += 1
        ts += 0.001
        obj = {"event": event, "node": node, "ts": f"{ts:.6f}", "seq": seq, "boot": 1_699_999_000, **fields}
        frames.append(json.dumps(obj, separators=(",", ":")).encode())

    for n in range(calls):
        user = f"user{rng.randrange(50_000)}"
        aor = f"{user}@example.com"
        call_id = f"{rng.getrandbits(64):016x}-{n}@203.0.113.7"
        emit("call_start", call_id=call_id, aor=aor, from_user=f"+49301234{n % 10000:04d}", from_name="Caller Name")
        emit(
            "register",
            aor=aor,
            contact=f"sip:{user}@198.51.100.{n % 250}:5060;transport=udp",
            src_ip=f"198.51.100.{n % 250}",
            src_port=5060,
            proto="udp",
            expires=600,
            user_agent=UA_DESK,
        )
        end = rng.choice(("call_answered", "call_cancelled", "call_failed"))
        if end == "call_failed":
            emit(end, call_id=call_id, aor=aor, code=603)
        else:
            emit(end, call_id=call_id, aor=aor)
        if n % 4 == 0:
            emit(
                "register",
                aor=aor,
                contact=f"sip:{user}@192.0.2.{n % 250}:49152;transport=tcp;pn-provider=apns",
                src_ip=f"192.0.2.{n % 250}",
                src_port=49152,
                proto="tcp",
                expires=3600,
                user_agent=UA_IPHONE,
                instance=f"<urn:uuid:{n:08d}-0000-4000-8000-000000000000>",
                pn_provider="apns",
                pn_prid=f"{n:064x}:voip",
                pn_param="ABCDE12345.org.linphone.phone.voip",
            )
        yield from frames
        frames.clear()
