"""Whom to push when a call starts: each account's push devices, learned
from their REGISTERs (RFC 8599 parameters as Linphone writes them), kept
while their registration lasts. Pure: time is passed in.

``pn-provider`` names the service (``apns``, ``apns.dev`` for Apple's
sandbox, ``fcm``); ``pn-prid`` the device's token (Linphone's iOS app
writes ``<token>:voip``, or ``<remote token>:remote&<voip token>:voip``:
the VoIP token is the one that wakes it for a call); ``pn-param`` for
APNs is ``<team id>.<bundle id>.voip`` (or ``.remote&voip``), whose VoIP
topic is ``<bundle id>.voip``.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass
from typing import Final

import msgspec

from .devices import device_id
from .events import CallStarted, Register

__all__ = ["PushBook", "PushDevice", "PushJob", "push_target"]

PROVIDERS: Final = ("apns", "apns.dev", "fcm")
# What may go into a request path or header: checked here, once.
_APNS_TOKEN_RE: Final = re.compile(r"[0-9A-Fa-f]{32,200}")
_FCM_TOKEN_RE: Final = re.compile(r"[A-Za-z0-9_:.\-]{1,4096}")
_TOPIC_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9.\-]{0,200}")


class PushDevice(msgspec.Struct, frozen=True):
    """One push device of an account, as kept (and saved with the state).
    ``expires_at`` is on the engine's clock."""

    aor: str
    device: str
    provider: str
    token: str
    topic: str  # APNs: the VoIP topic; FCM: ""
    expires_at: float


@dataclass(frozen=True, slots=True)
class PushJob:
    """One push to send: a call started for an account with this device."""

    call_id: str
    node: str  # the node the call is on (claims are made there)
    aor: str
    device: str
    provider: str
    token: str
    topic: str
    from_user: str
    from_name: str | None
    from_domain: str | None
    ts: float  # the call's start, Kamailio's clock
    received: float  # when the worker read it, the engine's clock

    @property
    def caller_uri(self) -> str:
        """Who calls, as a SIP URI, for the app's call screen."""
        return f"sip:{self.from_user}@{self.from_domain}" if self.from_domain else f"sip:{self.from_user}"

    @property
    def caller_name(self) -> str:
        return self.from_name or self.from_user


def push_target(reg: Register) -> tuple[str, str, str] | None:
    """(provider, token, topic) of a REGISTER's RFC 8599 parameters, or
    None when they do not name a device this worker can push."""
    provider = (reg.pn_provider or "").strip().lower()
    if provider not in PROVIDERS or not reg.pn_prid:
        return None
    prid = urllib.parse.unquote(reg.pn_prid.strip())
    if provider == "fcm":
        return (provider, prid, "") if _FCM_TOKEN_RE.fullmatch(prid) else None
    token = _voip_token(prid)
    topic = _voip_topic(urllib.parse.unquote(reg.pn_param or ""))
    if token is None or topic is None:
        return None
    return provider, token, topic


def _voip_token(prid: str) -> str | None:
    tokens = prid.split("&")
    if len(tokens) > 1:
        voip = [t for t in tokens if t.endswith(":voip")]
        if len(voip) != 1:
            return None
        tokens = voip
    token = tokens[0].removesuffix(":voip")
    return token if _APNS_TOKEN_RE.fullmatch(token) else None


def _voip_topic(param: str) -> str | None:
    _team, dot, rest = param.partition(".")
    if not dot:
        return None
    for suffix in (".remote&voip", ".voip&remote", ".voip"):
        if rest.endswith(suffix):
            topic = rest[: -len(suffix)] + ".voip"
            return topic if _TOPIC_RE.fullmatch(topic) else None
    return None


class PushBook:
    """The push devices of every account; at most ``max_devices``."""

    def __init__(self, max_devices: int = 100_000) -> None:
        self.max_devices = max_devices
        self._devices: dict[str, dict[str, PushDevice]] = {}
        self._count = 0
        self.refused = 0  # REGISTERs with push parameters this worker cannot use

    @property
    def device_count(self) -> int:
        return self._count

    def register(self, reg: Register, now: float) -> None:
        """A REGISTER (``now``: when it happened, on the engine's clock)."""
        if not reg.pn_provider:
            return
        dev = device_id(reg)
        if reg.expires == 0:
            self._drop(reg.aor, dev)
            return
        target = push_target(reg)
        if target is None:
            self.refused += 1
            return
        known = self._devices.get(reg.aor)
        if (known is None or dev not in known) and self._count >= self.max_devices:
            self._evict()
        self._put(PushDevice(reg.aor, dev, *target, now + reg.expires))

    def call_started(self, ev: CallStarted, now: float) -> list[PushJob]:
        """The pushes a call to ``ev.aor`` needs: one per live device."""
        devices = self._devices.get(ev.aor)
        if not devices:
            return []
        jobs = []
        for d in list(devices.values()):
            if d.expires_at <= now:
                self._drop(d.aor, d.device)
                continue
            job = PushJob(
                ev.call_id, ev.node, d.aor, d.device, d.provider, d.token, d.topic,
                ev.from_user, ev.from_name, ev.from_domain, ev.ts, now,
            )  # fmt: skip
            jobs.append(job)
        return jobs

    def forget(self, aor: str, device: str) -> None:
        """No more pushes to this device until it registers again (its
        provider said the token is gone or wrong)."""
        self._drop(aor, device)

    def export(self) -> list[PushDevice]:
        return [d for devices in self._devices.values() for d in devices.values()]

    def load(self, devices: list[PushDevice], offset: float = 0.0) -> None:
        """Add saved devices, their times moved by ``offset`` onto this clock."""
        for d in devices:
            self._put(msgspec.structs.replace(d, expires_at=d.expires_at + offset))

    def _put(self, d: PushDevice) -> None:
        devices = self._devices.setdefault(d.aor, {})
        if d.device not in devices:
            self._count += 1
        devices[d.device] = d

    def _drop(self, aor: str, device: str) -> None:
        devices = self._devices.get(aor)
        if devices is not None and devices.pop(device, None) is not None:
            self._count -= 1
            if not devices:
                del self._devices[aor]

    def _evict(self) -> None:
        aor, devices = next(iter(self._devices.items()))
        self._drop(aor, next(iter(devices)))
