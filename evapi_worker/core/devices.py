"""Which registrations come from push-woken devices, and who a device is."""

from __future__ import annotations

import re
from collections.abc import Iterable

from .events import Register

__all__ = ["PushDetector", "contact_keys", "device_id", "device_keys"]

_UA_CACHE_SIZE = 4096


def device_id(reg: Register) -> str:
    """Stable identity of one device across its re-registrations.

    ``+sip.instance`` (RFC 5626) survives contact changes; the RFC 8599
    ``pn-prid`` is the push token, also stable; the contact URI is the last
    resort and changes with the device's address.
    """
    if reg.instance:
        return reg.instance.strip().strip('"').strip("<>")
    if reg.pn_prid:
        return f"pn-prid:{reg.pn_prid}"
    return reg.contact


def _pn_prid(contact: str) -> str | None:
    for param in contact.split(";")[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() == "pn-prid" and value:
            return value.strip()
    return None


def contact_keys(contact: str) -> tuple[str, ...]:
    """What names the device behind a branch's Contact URI: the URI itself
    and, for RFC 8599 devices, its push token (stable when the address is
    not: a woken phone often registers from a new port)."""
    prid = _pn_prid(contact)
    return (contact, f"pn-prid:{prid}") if prid else (contact,)


def device_keys(reg: Register) -> tuple[str, ...]:
    """Every name of a registering device (its :func:`device_id`, Contact
    URI and push token), to match against the names of the branches that
    rang."""
    prid = reg.pn_prid or _pn_prid(reg.contact)
    dev = device_id(reg)
    return (dev, reg.contact, f"pn-prid:{prid}") if prid else (dev, reg.contact)


class PushDetector:
    """Tells push devices by User-Agent pattern or by RFC 8599 ``pn-provider``.

    The User-Agent patterns are regular expressions searched anywhere in the
    header (the Kamailio config of this project's origin matched
    ``LinphoneiOS``). Providers match by prefix, case-insensitively, so
    ``apns`` also covers Linphone's ``apns.dev`` sandbox.
    """

    def __init__(self, user_agents: Iterable[str], push_providers: Iterable[str]) -> None:
        patterns = [p for p in user_agents if p]
        self._ua = re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None
        self._providers = tuple(p.lower() for p in push_providers if p)
        # A platform has a few hundred distinct User-Agents at most; matching
        # each once saves a regex search per REGISTER.
        self._ua_cache: dict[str, bool] = {}

    def is_push(self, reg: Register) -> bool:
        if self._providers and reg.pn_provider and reg.pn_provider.lower().startswith(self._providers):
            return True
        ua = reg.user_agent
        if not ua or self._ua is None:
            return False
        known = self._ua_cache.get(ua)
        if known is None:
            known = self._ua.search(ua) is not None
            if len(self._ua_cache) >= _UA_CACHE_SIZE:
                self._ua_cache.clear()
            self._ua_cache[ua] = known
        return known
