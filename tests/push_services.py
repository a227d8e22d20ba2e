"""Both push stand-ins on loopback, and the settings that point the
worker's production clients at them (``url``, ``ca_file``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio

from evapi_worker.apns import ApnsSettings
from evapi_worker.config import PushSettings
from evapi_worker.fcm import FcmSettings
from evapi_worker.lab.push_standin import (
    ApnsStandIn,
    FcmStandIn,
    make_apns_key,
    make_service_account,
    make_tls,
    serve_standin,
)

TEAM, KEY_ID = "TEAM123456", "ABC123DEFG"
PROJECT = "evw-test"


@dataclass
class StandIns:
    apns: ApnsStandIn
    fcm: FcmStandIn
    settings: PushSettings


async def start_standins(nursery: trio.Nursery, folder: Path) -> StandIns:
    """Serve both stand-ins in ``nursery`` with a throw-away CA, an APNs key
    and an FCM service account made in ``folder``."""
    ca, cert, key = make_tls(folder / "tls")
    apns_key, account = folder / "AuthKey_ABC123DEFG.p8", folder / "fcm.json"
    apns = ApnsStandIn(make_apns_key(apns_key), KEY_ID, TEAM)
    apns_port = await nursery.start(partial(serve_standin, apns.handle, cert, key))
    fcm = FcmStandIn(b"", "", PROJECT)
    fcm_port = await nursery.start(partial(serve_standin, lambda *request: fcm.handle(*request), cert, key))
    fcm.audience = f"https://127.0.0.1:{fcm_port}/token"
    fcm.public_key = make_service_account(account, PROJECT, fcm.audience)
    fcm.client_email = json.loads(account.read_text())["client_email"]
    settings = PushSettings(
        apns=ApnsSettings(key_file=apns_key, key_id=KEY_ID, team_id=TEAM, url=f"https://127.0.0.1:{apns_port}",
                          ca_file=ca),
        fcm=FcmSettings(service_account_file=account, url=f"https://127.0.0.1:{fcm_port}", ca_file=ca),
    )  # fmt: skip
    return StandIns(apns, fcm, settings)
