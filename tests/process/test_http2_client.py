"""The push services' HTTP/2 client against a real HTTP/2 server over TLS
(the stand-in's): many requests on one connection, and the faults a
long-lived connection meets."""

from __future__ import annotations

import socket
import ssl
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from evapi_worker.apns import tls_context
from evapi_worker.http2_client import H2Client, H2Error
from evapi_worker.lab.push_standin import make_tls, serve_standin

from ..sipp_device import free_port


def echo(method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, Any] | None]:
    return (200 if path.startswith("/ok") else 404), {"path": path, "bytes": len(body)}


async def test_many_requests_share_one_connection_and_each_gets_its_own_answer(tmp_path: Path) -> None:
    ca, cert, key = make_tls(tmp_path)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(serve_standin, echo, cert, key))
        client = H2Client(f"https://127.0.0.1:{port}", tls_context(ca, http2_only=True), timeout=5)
        answers: dict[int, tuple[int, bytes]] = {}

        async def one(n: int) -> None:
            answers[n] = await client.request("POST", f"/ok/{n}" if n % 3 else f"/no/{n}", {"x-n": str(n)}, b"b" * n)

        async with trio.open_nursery() as requests:
            for n in range(200):
                requests.start_soon(one, n)
        assert all(answers[n][0] == (200 if n % 3 else 404) for n in range(200))
        assert all(f'"bytes": {n}'.encode() in answers[n][1] for n in range(200))
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_headers_arrive_as_sent_whether_indexed_or_not_and_unprintable_values_are_refused(tmp_path: Path) -> None:
    ca, cert, key = make_tls(tmp_path)
    seen: list[dict[str, str]] = []

    def record(method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, Any] | None]:
        seen.append(headers)
        return 200, None

    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(serve_standin, record, cert, key))
        client = H2Client(f"https://127.0.0.1:{port}", tls_context(ca, http2_only=True), timeout=5)
        for n in range(300):  # the same token each time (indexed from its second use), a new id each time
            headers = {"authorization": "bearer same-token", "X-Id": f"id-{n}"}
            assert (await client.request("POST", f"/ok/{n}", headers, b"x"))[0] == 200
        for bad in ("a\r\nb", "caf\u00e9", "tab\there"):
            with pytest.raises(H2Error, match="not printable ASCII"):
                await client.request("POST", "/ok", {"x-bad": bad}, b"")
        assert (await client.request("POST", "/ok/after", {}, b""))[0] == 200  # the connection unharmed
        await client.aclose()
        nursery.cancel_scope.cancel()
    assert [h["authorization"] for h in seen[:300]] == ["bearer same-token"] * 300
    assert [(h[":path"], h["x-id"]) for h in seen[:300]] == [(f"/ok/{n}", f"id-{n}") for n in range(300)]
    assert len(seen) == 301 and "x-bad" not in seen[-1]


async def test_a_lost_connection_fails_its_requests_and_the_next_one_reconnects(tmp_path: Path) -> None:
    ca, cert, key = make_tls(tmp_path)
    port = free_port(socket.SOCK_STREAM)
    client = H2Client(f"https://127.0.0.1:{port}", tls_context(ca, http2_only=True), timeout=2)
    with pytest.raises(H2Error, match="cannot connect"):
        await client.request("GET", "/ok", {}, b"")  # nobody listens yet
    for _ in range(2):  # served, stopped (the connection dies), served again
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve_standin, echo, cert, key, port=port))
            assert (await client.request("GET", "/ok", {}, b""))[0] == 200
            nursery.cancel_scope.cancel()
        with pytest.raises(H2Error):
            await client.request("GET", "/ok", {}, b"")
    await client.aclose()


async def test_a_server_that_does_not_speak_http2_is_an_error_not_a_hang(tmp_path: Path) -> None:
    ca, cert, key = make_tls(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert), str(key))
    context.set_alpn_protocols(["http/1.1"])
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_ssl_over_tcp, _silent, 0, context)
        port = listeners[0].transport_listener.socket.getsockname()[1]
        client = H2Client(f"https://127.0.0.1:{port}", tls_context(ca), timeout=2)
        with pytest.raises(H2Error, match="does not speak HTTP/2"):
            await client.request("GET", "/", {}, b"")
        nursery.cancel_scope.cancel()


async def _silent(stream: trio.SSLStream[trio.SocketStream]) -> None:
    """An HTTP/1.1 server that shakes hands and says nothing."""
    await stream.do_handshake()
    await trio.sleep_forever()
