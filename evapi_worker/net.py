"""Small socket helpers: whether an address can be listened on, and free
ports for SIPp processes, the demo and the tests."""

from __future__ import annotations

import socket

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
            return port
    raise OSError(f"no free pair of media ports on {host}")


def free_port(host: str, kind: int = socket.SOCK_DGRAM) -> int:
    """A port the system considers free on ``host`` now (it may be taken
    again before it is used: good enough for loopback tools and tests)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port
