"""The /metrics and /healthz endpoint."""

from __future__ import annotations

import errno
import socket
from functools import partial

import pytest
import trio
from prometheus_client import CollectorRegistry, Counter

from evapi_worker.http_server import MetricsPage, accept_forever, respond, serve_http


def registry() -> CollectorRegistry:
    r = CollectorRegistry()
    Counter("evapi_worker_test", "A test counter.", registry=r).inc(3)
    return r


def healthy() -> tuple[bool, list[str]]:
    return True, []


def down() -> tuple[bool, list[str]]:
    return False, ["edge2"]


def test_metrics_in_prometheus_text_format() -> None:
    reply = respond("GET", "/metrics", MetricsPage(registry()), healthy, 0.0)
    head, body = reply.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"text/plain; version=0.0.4" in head
    assert b"evapi_worker_test_total 3.0" in body


def test_health_says_which_nodes_are_down() -> None:
    assert respond("GET", "/healthz", MetricsPage(registry()), healthy, 0.0).startswith(b"HTTP/1.1 200 OK")
    reply = respond("GET", "/healthz?x=1", MetricsPage(registry()), down, 0.0)
    assert reply.startswith(b"HTTP/1.1 503")
    assert reply.endswith(b"not connected: edge2\n")


def test_the_metrics_text_is_made_again_once_a_quarter_second_old() -> None:
    r = registry()
    page = MetricsPage(r)
    first = page.response(10.0)
    Counter("evapi_worker_later", "Made after the first page.", registry=r).inc()
    # A flood of requests within its age shares one text: made once.
    assert all(page.response(10.0 + i / 1000) is first for i in range(200)) and page.made == 1
    assert b"evapi_worker_later_total 1.0" in page.response(10.25) and page.made == 2


def test_other_paths_and_methods() -> None:
    assert respond("GET", "/", MetricsPage(registry()), healthy, 0.0).startswith(b"HTTP/1.1 404")
    assert respond("POST", "/metrics", MetricsPage(registry()), healthy, 0.0).startswith(b"HTTP/1.1 405")
    head = respond("HEAD", "/metrics", MetricsPage(registry()), healthy, 0.0)
    assert head.endswith(b"\r\n\r\n") and b"evapi_worker_test" not in head


async def fetch(port: int, request: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    return data


async def test_served_over_tcp_and_bad_requests_are_answered() -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_http, "127.0.0.1", 0, registry(), healthy)
        with trio.fail_after(5):
            reply = await fetch(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            assert b"evapi_worker_test_total 3.0" in reply
            assert (await fetch(port, b"garbage\r\n\r\n")).startswith(b"HTTP/1.1 400")
        nursery.cancel_scope.cancel()


async def test_idle_clients_give_way_to_a_scrape_and_stay_under_the_cap() -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            partial(serve_http, "127.0.0.1", 0, registry(), healthy, max_connections=4, timeout=30)
        )
        idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(50)]
        await trio.sleep(0.1)
        # Served at once, though 50 clients that send nothing came first
        # and would hold their places for 30 s.
        with trio.fail_after(1):
            answer = await fetch(port, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert b"evapi_worker_test_total 3.0" in answer
        # The server holds at most 4 of them open: the others were closed.
        closed = 0
        for stream in idle:
            with trio.move_on_after(0.2):
                if await stream.receive_some(1) == b"":
                    closed += 1
            await stream.aclose()
        assert closed >= 46
        nursery.cancel_scope.cancel()


async def test_a_client_that_sends_nothing_is_closed_after_the_timeout() -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(serve_http, "127.0.0.1", 0, registry(), healthy, timeout=0.3))
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(2):
            assert await stream.receive_some(1) == b""
        await stream.aclose()
        nursery.cancel_scope.cancel()


class OutOfDescriptors:
    """A listening socket whose first accepts fail with EMFILE."""

    def __init__(self, sock: socket.socket, failures: int) -> None:
        self.sock = sock
        self.failures = failures
        self.accepted = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self) -> tuple[socket.socket, object]:
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        self.accepted += 1
        return self.sock.accept()


async def test_out_of_descriptors_on_accept_is_waited_out_not_an_end(caplog: pytest.LogCaptureFixture) -> None:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        sock.setblocking(False)
        listener = OutOfDescriptors(sock, failures=3)
        served: list[socket.socket] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept_forever, listener, served.append)
            with socket.create_connection(sock.getsockname()):
                with trio.fail_after(2):
                    while not served:
                        await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        for conn in served:
            conn.close()
    warnings = [r for r in caplog.records if r.getMessage().startswith("http accept failed")]
    assert len(warnings) == 1  # said once, not once per attempt
