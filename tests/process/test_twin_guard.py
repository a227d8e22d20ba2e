"""The twin socket's guard on real sockets (this process standing in for
SIPp: a process may take copies of its own descriptors as of its child's)."""

from __future__ import annotations

import os
import socket

import pytest

from evapi_worker.twin_guard import admit_only, filter_program, listener_of, peers_of, queued


def test_the_filter_is_nine_instructions_naming_the_port() -> None:
    program = filter_program(40123)
    assert len(program) == 9 * 8
    assert (40123).to_bytes(4, "little") in program


def test_only_the_admitted_address_and_port_get_a_connection() -> None:
    with socket.create_server(("0.0.0.0", 0)) as server:
        port = server.getsockname()[1]
        # Someone got in before the guard: waiting to be accepted, then accepted.
        early = socket.create_connection(("127.0.0.1", port))
        copy = listener_of(os.getpid(), port)
        assert copy is not None
        with copy, early:
            assert queued(copy) == 1
            accepted, _ = server.accept()
            with accepted:
                assert queued(copy) == 0
                assert peers_of(os.getpid(), port) == [early.getsockname()]
                ours = socket.socket()
                ours.bind(("127.0.0.1", 0))
                admit_only(copy, ours.getsockname())
                # From here on: strangers' SYNs are dropped, on every address.
                for host in ("127.0.0.1", "127.0.0.2"):
                    with pytest.raises(OSError, match="timed out"):
                        socket.create_connection((host, port), timeout=0.5)
                ours.connect(("127.0.0.1", port))
                mine, _ = server.accept()
                with ours, mine:
                    assert sorted(peers_of(os.getpid(), port)) == sorted([early.getsockname(), ours.getsockname()])
                    mine.sendall(b"ok")
                    assert ours.recv(2) == b"ok"


def test_a_port_nothing_listens_on_has_no_listener() -> None:
    with socket.socket() as unbound:
        unbound.bind(("127.0.0.1", 0))
        assert listener_of(os.getpid(), unbound.getsockname()[1]) is None
