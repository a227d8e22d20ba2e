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

import enum
import hashlib
import heapq
import re
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

import msgspec

from .devices import device_id, device_keys
from .events import CallStarted, Register

__all__ = ["PushBook", "PushDevice", "PushJob", "Refusal", "push_target"]

PROVIDERS: Final = ("apns", "apns.dev", "fcm")
# What may go into a request path or header: checked here, once.
_APNS_TOKEN_RE: Final = re.compile(r"[0-9A-Fa-f]{32,200}")
_FCM_TOKEN_RE: Final = re.compile(r"[A-Za-z0-9_:.\-]{1,4096}")
_TOPIC_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9.\-]{0,200}")
# Accounts named in one eviction report at most (the rest are counted as "*").
_EVICTION_ACCOUNTS: Final = 64
# Unregistrations remembered by their time, so that a REGISTER stamped
# before one (its event read after it: Kamailio's processes emit in any
# order) does not bring the device back: the last ones, at most.
_ENDINGS: Final = 10_000


class PushDevice(msgspec.Struct, frozen=True):
    """One push device of an account, as kept (and saved with the state).
    ``expires_at`` is on the engine's clock."""

    aor: str
    device: str
    provider: str
    token: str
    topic: str  # APNs: the VoIP topic; FCM: ""
    expires_at: float
    registered: float = 0.0  # Kamailio time of the REGISTER that named it (unix)


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

    @property
    def collapse_id(self) -> str:
        """The same for every push to the account (its name not shown):
        a phone offline through several of its calls is woken once, for
        the latest."""
        return "evw-" + hashlib.sha256(self.aor.encode()).hexdigest()[:32]


class Refusal(enum.StrEnum):
    """Why a REGISTER's push parameters name no device this worker can
    push (the ``reason`` label of ``push_devices_refused_total``)."""

    PROVIDER = "provider"  # pn-provider is not apns, apns.dev or fcm
    TOKEN = "token"  # pn-prid is missing, or not a token of that provider
    TOPIC = "topic"  # pn-param names no VoIP topic (APNs)


def push_target(reg: Register) -> tuple[str, str, str] | Refusal:
    """(provider, token, topic) of a REGISTER's RFC 8599 parameters, or
    why they do not name a device this worker can push."""
    provider = (reg.pn_provider or "").strip().lower()
    if provider not in PROVIDERS:
        return Refusal.PROVIDER
    prid = urllib.parse.unquote((reg.pn_prid or "").strip())
    if provider == "fcm":
        return (provider, prid, "") if _FCM_TOKEN_RE.fullmatch(prid) else Refusal.TOKEN
    token = _voip_token(prid)
    if token is None:
        return Refusal.TOKEN
    topic = _voip_topic(urllib.parse.unquote(reg.pn_param or ""))
    if topic is None:
        return Refusal.TOPIC
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
    """The push devices of every account: at most ``max_per_account`` for
    one account (past it, that account's least recently registered device
    goes, never another account's) and ``max_devices`` in all (past it a
    new device is not kept: counted, never made room for by dropping
    another account's). Registrations that end (an unregistration, its
    expiry) free their place. What is not kept is reported by
    :meth:`take_evictions`."""

    def __init__(self, max_devices: int = 100_000, max_per_account: int = 32) -> None:
        self.max_devices = max_devices
        self.max_per_account = max_per_account
        self._devices: dict[str, dict[str, PushDevice]] = {}
        self._count = 0
        # (expires_at, aor, device) of every device put, for freeing the
        # expired ones; an entry whose device registered again since is
        # stale and skipped.
        self._expiry: list[tuple[float, str, str]] = []
        self.refused = 0  # REGISTERs with push parameters this worker cannot use
        self._refusals: dict[tuple[Refusal, str], int] = {}  # (why, account) -> not reported yet
        self.evicted = 0  # devices dropped or not kept to stay under the bounds
        self._evictions: dict[str, int] = {}  # account -> not reported yet
        # (account, token or "*") -> Kamailio time of its last unregistration
        self._ended: OrderedDict[tuple[str, str], float] = OrderedDict()

    @property
    def device_count(self) -> int:
        return self._count

    def register(self, reg: Register, now: float) -> None:
        """A REGISTER (``now``: when it happened, on the engine's clock)."""
        if reg.expires == 0:
            self._unregister(reg)
            return
        if not reg.pn_provider:
            return
        target = push_target(reg)
        if isinstance(target, Refusal):
            self._refused(target, reg.aor)
            return
        if self._ended and self._ended_after(reg, target[1]):
            return  # unregistered after this REGISTER: its event came late
        dev = device_id(reg)
        known = self._devices.get(reg.aor)
        if known is None or dev not in known:
            self._free_expired(now)
            known = self._devices.get(reg.aor)
            if known is not None and len(known) >= self.max_per_account:
                self._drop(reg.aor, next(iter(known)))  # the account's least recently registered
                self._evicted(reg.aor)
            elif self._count >= self.max_devices:
                self._evicted(reg.aor)  # the new device is not kept
                return
        self._put(PushDevice(reg.aor, dev, *target, now + reg.expires, reg.ts))

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

    def forget(self, aor: str, device: str, token: str, gone_since: float | None = None) -> bool:
        """No more pushes to this device until it registers again: its
        provider said ``token`` is gone or wrong. Kept when it registered
        since with another token, or (``gone_since``: since when the
        provider knows the token is gone, unix time) registered again after
        that moment. Whether it was forgotten."""
        known = self._devices.get(aor, {}).get(device)
        if known is None or known.token != token:
            return False
        if gone_since is not None and known.registered > gone_since:
            return False
        self._drop(aor, device)
        return True

    def take_refusals(self) -> dict[tuple[Refusal, str], int]:
        """REGISTERs whose push parameters were refused since the last
        call, by (why, account): a few dozen accounts named at most, the
        rest under ``*``."""
        out, self._refusals = self._refusals, {}
        return out

    def take_evictions(self) -> dict[str, int]:
        """Devices dropped or not kept since the last call, by account (a
        few dozen accounts named at most, the rest under ``*``)."""
        out, self._evictions = self._evictions, {}
        return out

    def export(self) -> list[PushDevice]:
        return [d for devices in self._devices.values() for d in devices.values()]

    def load(self, devices: list[PushDevice]) -> None:
        """Add saved devices (their times already on this clock), within the bounds."""
        for d in devices:
            known = self._devices.get(d.aor)
            if (known is None or d.device not in known) and (
                self._count >= self.max_devices or (known is not None and len(known) >= self.max_per_account)
            ):
                self._evicted(d.aor)
                continue
            self._put(d)

    def _unregister(self, reg: Register) -> None:
        """An ended registration frees its device: the one its Contact,
        +sip.instance or token names, or, for ``Contact: *``, every device
        of the account."""
        everything = reg.contact.strip() == "*"
        found = push_target(reg) if reg.pn_provider else None
        target = None if isinstance(found, Refusal) else found
        if everything:
            self._note_ended((reg.aor, "*"), reg.ts)
        elif target is not None:
            self._note_ended((reg.aor, target[1]), reg.ts)
        devices = self._devices.get(reg.aor)
        if not devices:
            return
        if everything:
            for device in list(devices):
                self._drop(reg.aor, device)
            return
        names = set(device_keys(reg))
        for d in list(devices.values()):
            if d.device in names or (target is not None and d.token == target[1]):
                self._drop(reg.aor, d.device)

    def _note_ended(self, key: tuple[str, str], ts: float) -> None:
        ended = self._ended
        old = ended.pop(key, None)
        ended[key] = ts if old is None or ts > old else old
        if len(ended) > _ENDINGS:
            ended.popitem(last=False)

    def _ended_after(self, reg: Register, token: str) -> bool:
        ended = self._ended
        return ended.get((reg.aor, "*"), -1.0) >= reg.ts or ended.get((reg.aor, token), -1.0) >= reg.ts

    def _put(self, d: PushDevice) -> None:
        devices = self._devices.setdefault(d.aor, {})
        if devices.pop(d.device, None) is None:
            self._count += 1
        devices[d.device] = d  # the account's most recently registered now
        heapq.heappush(self._expiry, (d.expires_at, d.aor, d.device))
        if len(self._expiry) > 2 * self._count + 1024:
            # Mostly stale entries of devices that registered again: rebuilt.
            self._expiry = [(x.expires_at, x.aor, x.device) for x in self.export()]
            heapq.heapify(self._expiry)

    def _free_expired(self, now: float) -> None:
        heap = self._expiry
        while heap and heap[0][0] <= now:
            when, aor, device = heapq.heappop(heap)
            current = self._devices.get(aor, {}).get(device)
            if current is not None and current.expires_at == when:
                self._drop(aor, device)

    def _drop(self, aor: str, device: str) -> None:
        devices = self._devices.get(aor)
        if devices is not None and devices.pop(device, None) is not None:
            self._count -= 1
            if not devices:
                del self._devices[aor]

    def _refused(self, why: Refusal, aor: str) -> None:
        self.refused += 1
        key = (why, aor)
        if key not in self._refusals and len(self._refusals) >= _EVICTION_ACCOUNTS:
            key = (why, "*")
        self._refusals[key] = self._refusals.get(key, 0) + 1

    def _evicted(self, aor: str) -> None:
        self.evicted += 1
        key = aor if aor in self._evictions or len(self._evictions) < _EVICTION_ACCOUNTS else "*"
        self._evictions[key] = self._evictions.get(key, 0) + 1
