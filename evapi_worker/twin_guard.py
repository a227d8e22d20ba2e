"""Only the worker talks to the SIPp it started.

SIPp's twin socket (3PCC controller B) listens on every address of the
host, whatever ``-3pcc`` names, and takes every connection: the last one
accepted becomes the twin, and any control connection that closes ends
SIPp. Anyone who reaches the port could place calls with the Call-ID and
display name of their choosing, or end every fake call in flight.

So the worker closes the door behind itself. Its end of the twin
connection is bound first (127.0.0.1, a port of its own); before it
connects, it takes a copy of SIPp's listening socket (``pidfd_getfd``: a
process may do so to its own child) and attaches a socket filter that
drops every packet not from that address and port. A stranger's SYN is
dropped (the connection is never made); the worker's connection is
accepted, and nothing after it. A stranger who got in before the filter
is found (:func:`strangers`): that SIPp is ended and another started.

Linux only (pidfd_getfd since 5.6, and the right to trace one's own
child); where either is missing, :class:`GuardUnavailable` says why.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
from typing import Final

__all__ = ["GuardUnavailable", "admit_only", "filter_program", "listener_of", "peers_of", "queued"]

_SYS_PIDFD_GETFD: Final = 438  # the same number on every architecture
_SO_ATTACH_FILTER: Final = 26
_SKF_NET_OFF: Final = -0x100000  # classic BPF: offsets from the network header
# Classic BPF opcodes.
_LD_B_ABS: Final = 0x30
_LD_H_ABS: Final = 0x28
_LD_W_ABS: Final = 0x20
_AND_K: Final = 0x54
_JEQ_K: Final = 0x15
_RET_K: Final = 0x06

_libc = ctypes.CDLL(None, use_errno=True)


class GuardUnavailable(Exception):
    """The twin socket cannot be restricted on this host (why)."""


def _instruction(code: int, jump_true: int, jump_false: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jump_true, jump_false, k & 0xFFFFFFFF)


def filter_program(port: int) -> bytes:
    """A classic BPF program that passes TCP segments from 127.0.0.1:``port``
    (IPv4, or IPv4 on an IPv6 socket) and drops everything else."""
    return b"".join(
        [
            _instruction(_LD_B_ABS, 0, 0, _SKF_NET_OFF),  # IP version and header length
            _instruction(_AND_K, 0, 0, 0xF0),
            _instruction(_JEQ_K, 0, 4, 0x40),  # not IPv4: drop
            _instruction(_LD_W_ABS, 0, 0, _SKF_NET_OFF + 12),  # source address
            _instruction(_JEQ_K, 0, 2, 0x7F000001),
            _instruction(_LD_H_ABS, 0, 0, 0),  # TCP source port (the socket's data starts at the TCP header)
            _instruction(_JEQ_K, 1, 0, port),
            _instruction(_RET_K, 0, 0, 0),  # drop
            _instruction(_RET_K, 0, 0, 0xFFFFFFFF),  # pass
        ]
    )


def _copy_fd(pidfd: int, fd: int) -> int | None:
    """A copy of ``fd`` of the process ``pidfd`` names; None if it has no such fd."""
    copy = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
    if copy >= 0:
        return int(copy)
    code = ctypes.get_errno()
    if code == errno.EBADF:
        return None  # closed meanwhile
    if code in (errno.ENOSYS, errno.EPERM, errno.EACCES):
        raise GuardUnavailable(f"pidfd_getfd: {os.strerror(code)}")
    if code == errno.ESRCH:
        return None
    raise OSError(code, os.strerror(code))


def _stream_sockets(pid: int) -> list[socket.socket]:
    """Copies of the process's TCP sockets (the caller closes them)."""
    try:
        pidfd = os.pidfd_open(pid)
    except AttributeError:
        raise GuardUnavailable("no pidfd_open") from None
    except ProcessLookupError:
        return []
    found: list[socket.socket] = []
    try:
        try:
            names = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            return []
        for name in names:
            try:
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
            except OSError:
                continue
            copy = _copy_fd(pidfd, int(name))
            if copy is None:
                continue
            sock = socket.socket(fileno=copy)
            if sock.type == socket.SOCK_STREAM and sock.family in (socket.AF_INET, socket.AF_INET6):
                found.append(sock)
            else:
                sock.close()
    except BaseException:
        for sock in found:
            sock.close()
        raise
    finally:
        os.close(pidfd)
    return found


def _port(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


def listener_of(pid: int, port: int) -> socket.socket | None:
    """A copy of the socket process ``pid`` listens on at ``port``; None
    while it does not."""
    listener = None
    for sock in _stream_sockets(pid):
        if listener is None and _port(sock) == port and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            listener = sock
        else:
            sock.close()
    return listener


def admit_only(listener: socket.socket, peer: tuple[str, int]) -> None:
    """From now on ``listener`` completes connections from ``peer`` (an
    IPv4 loopback address and port) only."""
    if peer[0] != "127.0.0.1":
        raise ValueError("the twin connection comes from 127.0.0.1")
    program = ctypes.create_string_buffer(filter_program(peer[1]))
    fprog = struct.pack("@HP", len(program.raw) // 8, ctypes.addressof(program))
    listener.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)


def peers_of(pid: int, port: int) -> list[tuple[str, int]]:
    """Where the connections process ``pid`` accepted on ``port`` come from
    (IPv4-mapped addresses as IPv4)."""
    peers = []
    for sock in _stream_sockets(pid):
        with sock:
            if _port(sock) != port or sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                continue
            try:
                host, peer_port = sock.getpeername()[:2]
            except OSError:
                continue  # closed meanwhile
            peers.append((host.removeprefix("::ffff:"), int(peer_port)))
    return peers


def queued(listener: socket.socket) -> int:
    """Connections made and waiting to be accepted (TCP_INFO's unacked is
    the accept queue's length on a listening socket)."""
    info = listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    # struct tcp_info: 8 one-byte fields, then u32 rto, ato, snd_mss, rcv_mss, unacked.
    return int(struct.unpack_from("I", info, 8 + 4 * 4)[0])
