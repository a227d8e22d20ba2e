"""Where a fake call goes (the address the device's REGISTER came from) and whom it names."""

from __future__ import annotations

import pytest

from evapi_worker.core.engine import CallInfo, EndKind
from evapi_worker.core.events import CallStarted, Register
from evapi_worker.core.sip_values import UnsafeValue
from evapi_worker.fake_calls import device_route, parties
from tests.helpers import Wire


def register(src_ip: str, proto: str = "udp") -> Register:
    event = Wire().register(1.0, src_ip=src_ip, proto=proto)
    assert isinstance(event, Register)
    return event


@pytest.mark.parametrize(
    ("src_ip", "proto", "route"),
    [
        ("192.0.2.10", "udp", "sip:192.0.2.10:50000;transport=udp"),
        ("255.255.255.255", "tls", "sip:255.255.255.255:50000;transport=tls"),
        ("0.0.0.0", "tcp", "sip:0.0.0.0:50000;transport=tcp"),
        ("2001:DB8::0001", "tcp", "sip:[2001:db8::1]:50000;transport=tcp"),  # written as ip_address does
        ("::ffff:192.0.2.10", "udp", "sip:[::ffff:c000:20a]:50000;transport=udp"),
    ],
)
def test_the_route_is_the_registers_source_written_canonically(src_ip: str, proto: str, route: str) -> None:
    assert device_route(register(src_ip, proto)) == route


@pytest.mark.parametrize(
    "src_ip", ["256.1.1.1", "010.0.0.1", "192.0.2", "192.0.2.10 ", "192.0.2.10\n", "bob.example.com", "1.2.3.4;x"]
)
def test_a_source_that_is_not_an_ip_address_is_refused(src_ip: str) -> None:
    with pytest.raises(UnsafeValue, match="src_ip"):
        device_route(register(src_ip))


def test_an_account_without_a_domain_is_called_at_the_calls_sip_domain() -> None:
    call = CallInfo("c@x", "bob", "alice", None, "caller.example.net", EndKind.ANSWERED, 200, "voip.example.org")
    who = parties(call, "192.0.2.1")
    assert (who.callee_user, who.callee_domain) == ("bob", "voip.example.org")
    older = CallInfo("c@x", "bob", "alice", None, None, EndKind.ANSWERED, 200)  # a node whose routes predate it
    assert parties(older, "192.0.2.1").callee_domain == "192.0.2.1"
    with_domain = CallInfo("c@x", "bob@example.com", "alice", None, None, EndKind.ANSWERED, 200, "other.example")
    assert parties(with_domain, "192.0.2.1").callee_domain == "example.com"  # the account's own domain first


def test_the_call_start_event_carries_the_called_domain() -> None:
    wire = Wire()
    event = wire.start(1.0, call_id="c@x", aor="bob", domain="voip.example.org")
    assert isinstance(event, CallStarted) and event.domain == "voip.example.org"
    empty = wire.start(2.0, call_id="c@y", aor="bob", domain="<null>")  # Kamailio's unset variable
    assert isinstance(empty, CallStarted) and empty.domain is None
