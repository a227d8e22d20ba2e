"""Make event data safe for SIP headers and SIPp's twin messages.

Everything here comes from the network (a caller picks their own display
name), so nothing reaches SIPp or a SIP header without passing one of these
functions. A value that can be made safe without
changing its meaning is (a ``;`` in a user part becomes ``%3B``, which SIP
compares as equal); anything else raises :class:`UnsafeValue`, which names
the field and the problem.

A twin message (sipp_twin.py) separates a fake call's fields by spaces and
ends lines with CR LF: no value here holds a control character, and only
the display name a space.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Final

__all__ = [
    "CALL_ID_PATTERN",
    "UnsafeValue",
    "bracketed",
    "call_id",
    "display_name",
    "ip_host",
    "sip_host",
    "sip_uri",
    "sip_user",
    "token",
]

_MAX_FIELD: Final = 256
_CONTROL_RE: Final = re.compile(r"[\x00-\x1f\x7f]")
# RFC 3261 user = 1*( unreserved / escaped / user-unreserved ), minus ';',
# which SIPp would take as a field separator.
_USER_SAFE: Final = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.!~*'()&=+$,?/")
_HEX: Final = frozenset("0123456789abcdefABCDEF")
# RFC 3261 callid = word [ "@" word ]; word characters as in section 25.1.
_WORD: Final = r"[A-Za-z0-9\-.!%*_+`'~()<>:\\\"/\[\]?{}]+"
CALL_ID_PATTERN: Final = f"{_WORD}(@{_WORD})?"
"""A SIP Call-ID (the events' schema checks it too)."""
_CALL_ID_RE: Final = re.compile(CALL_ID_PATTERN)
_HOSTNAME_RE: Final = re.compile(
    r"(?=.{1,253}\Z)([A-Za-z0-9]([A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9]([A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.?"
)
_IPV4_RE: Final = re.compile(r"(25[0-5]|2[0-4]\d|1?\d?\d)(\.(25[0-5]|2[0-4]\d|1?\d?\d)){3}")
_IPV6_RE: Final = re.compile(r"\[[0-9A-Fa-f:.]{2,45}\]")
# IPv4 as ipaddress writes it (no leading zeros): taken as it is.
_OCTET: Final = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_CANONICAL_IPV4_RE: Final = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")
_TOKEN_RE: Final = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]{1,128}")


class UnsafeValue(ValueError):
    """A value that cannot be made safe for where it would go."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def _check_common(field: str, value: str) -> None:
    if not value:
        raise UnsafeValue(field, "is empty")
    if len(value) > _MAX_FIELD:
        raise UnsafeValue(field, f"is longer than {_MAX_FIELD} characters")
    if _CONTROL_RE.search(value):
        raise UnsafeValue(field, "contains a control character (CR, LF, NUL...)")


def call_id(value: str) -> str:
    """A Call-ID as SIP allows it (word ["@" word]), unchanged."""
    _check_common("call_id", value)
    if _CALL_ID_RE.fullmatch(value) is None:
        raise UnsafeValue("call_id", "has characters a SIP Call-ID may not contain")
    return value


def sip_user(field: str, value: str) -> str:
    """A SIP URI user part, percent-encoding what may not stand bare."""
    _check_common(field, value)
    out: list[str] = []
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == "%" and i + 2 < len(value) and value[i + 1] in _HEX and value[i + 2] in _HEX:
            out.append(value[i : i + 3])  # already escaped
            i += 3
            continue
        if ch in _USER_SAFE:
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode())
        i += 1
    return "".join(out)


def bracketed(host: str) -> str:
    """An address as SIP and SIPp write it with a port: IPv6 in brackets."""
    return f"[{host}]" if ":" in host else host


def ip_host(field: str, value: str) -> str:
    """An IP address as a SIP host: written as ``ipaddress`` writes it, an
    IPv6 one in brackets."""
    if _CANONICAL_IPV4_RE.fullmatch(value):
        return value  # already so (and 20 times cheaper than ipaddress)
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        raise UnsafeValue(field, "is not an IP address") from None
    return bracketed(str(ip))


def sip_host(field: str, value: str) -> str:
    """A SIP URI host: a hostname, IPv4 address or bracketed IPv6 address."""
    _check_common(field, value)
    if _HOSTNAME_RE.fullmatch(value) or _IPV4_RE.fullmatch(value) or _IPV6_RE.fullmatch(value):
        return value
    raise UnsafeValue(field, "is not a hostname or IP address")


def display_name(value: str) -> str:
    """A display name as a quoted-string followed by a space, ready for From.

    The value is the quoted-string's content as Kamailio saw it, so its
    quoted-pairs (``\\"``, ``\\\\``) are kept as they are; a bare ``"`` or a
    lone trailing ``\\`` is escaped.
    """
    _check_common("from_name", value)
    out: list[str] = []
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == "\\" and i + 1 < len(value):
            out.append(value[i : i + 2])  # a quoted-pair stays one
            i += 2
            continue
        out.append("\\" + ch if ch in '"\\' else ch)
        i += 1
    return '"' + "".join(out) + '" '


def token(field: str, value: str) -> str:
    """A SIP token (used for the pin key and the reason label)."""
    if _TOKEN_RE.fullmatch(value) is None:
        raise UnsafeValue(field, "is not a SIP token of 1 to 128 characters")
    return value


# Quotes pass: apps send quoted URI parameters (pn-prid="ab:cd"), Kamailio's
# registrar stores them, and the URI only travels in JSON to a node that
# compares it with its location table.
_URI_RE: Final = re.compile(r"sips?:[^\s<>]{1,500}", re.IGNORECASE)


def sip_uri(field: str, value: str) -> str:
    """A SIP URI to hand to Kamailio in a command (no spaces, angle brackets
    or control characters)."""
    if _CONTROL_RE.search(value) or _URI_RE.fullmatch(value) is None:
        raise UnsafeValue(field, "is not a sip: or sips: URI without spaces, angle brackets or control characters")
    return value
