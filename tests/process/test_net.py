"""Free ports: what the demo, the SIPp runner and the tests listen on."""

from __future__ import annotations

import socket

from evapi_worker.net import free_media_port, free_port


def test_a_port_handed_out_is_not_handed_out_again_soon() -> None:
    # Found free, a port stays free until its user binds it, and the system
    # offers the same number again meanwhile: a SIP port and an evapi port
    # picked one after the other were once one port, and Kamailio could not
    # start. Among 2,000 picks the system repeats itself many times.
    picked = [free_port("127.0.0.1", kind) for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM) for _ in range(700)]
    media = [free_media_port("127.0.0.1") for _ in range(300)]
    every = picked + media + [port + 2 for port in media]
    assert len(set(every)) == len(every)
