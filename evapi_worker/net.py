"""Small socket helpers: whether an address can be listened on, and free
ports for SIPp processes, the demo and the tests."""

from __future__ import annotations

import socket
import threading

__all__ = ["bind_error", "free_media_port", "free_port"]


def bind_error(host: str, port: int, kind: int = socket.SOCK_STREAM) -> OSError | None:
    """Why ``host:port`` cannot be listened on now, or None when it can.
    TCP is tried as servers bind, so old TIME_WAIT connections do not count."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, kind) as s:
            if kind == socket.SOCK_STREAM:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as exc:
        return exc
    return None


# Ports handed out lately: a port found free is free again until its user
# binds it, and the system hands the same number out again meanwhile (a
# SIP port and an evapi port picked one after the other were seen to be one
# port). Remembered for the last few thousand, not forever: a long-running
# worker picks ports for every fake call.
_RECENT: dict[int, None] = {}  # in the order handed out
_RECENT_MAX = 4096
_RECENT_LOCK = threading.Lock()


def _hand_out(port: int) -> bool:
    """Whether ``port`` may be handed out now (not lately); notes it if so."""
    with _RECENT_LOCK:
        if port in _RECENT:
            return False
        if len(_RECENT) == _RECENT_MAX:
            del _RECENT[next(iter(_RECENT))]
        _RECENT[port] = None
        return True


def free_media_port(host: str) -> int:
    """A UDP port ``p`` with ``p + 2`` free too on ``host`` now: SIPp binds
    its audio and video sockets there. Left to itself every SIPp tries
    6000, 6002... 6198, and a hundred processes on a host exhaust them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(50):
        with socket.socket(family, socket.SOCK_DGRAM) as audio:
            audio.bind((host, 0))
            port: int = audio.getsockname()[1]
            if port + 2 > 65535 or bind_error(host, port + 2, socket.SOCK_DGRAM) is not None:
                continue
            if _hand_out(port) and _hand_out(port + 2):
                return port
    raise OSError(f"no free pair of media ports on {host}")


def free_port(host: str, kind: int = socket.SOCK_DGRAM) -> int:
    """A port the system considers free on ``host`` now, and not handed out
    lately by this process (another process may still take it before it is
    used: good enough for loopback tools and tests)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(100):
        with socket.socket(family, kind) as s:
            s.bind((host, 0))
            port: int = s.getsockname()[1]
        if _hand_out(port):
            return port
    raise OSError(f"no free port on {host} that was not handed out lately")
