"""The demo's address checks: IPv6 where the bundled config takes it."""

from __future__ import annotations

from pathlib import Path

import pytest

from evapi_worker.config import ConfigError
from evapi_worker.core.sip_values import bracketed
from evapi_worker.lab.demo import DemoOptions, check_demo_addresses
from evapi_worker.lab.kamailio_process import KamailioProcess


def test_ipv6_sip_is_accepted_and_ipv6_evapi_is_refused_with_the_reason() -> None:
    check_demo_addresses(DemoOptions(sip=("::1", 5060)))
    check_demo_addresses(DemoOptions(sip=("127.0.0.1", 5060), sip6="::1"))
    with pytest.raises(ConfigError, match="evapi module cannot listen on an IPv6"):
        check_demo_addresses(DemoOptions(evapi=("::1", 8448)))
    with pytest.raises(ConfigError, match="--sip6"):
        check_demo_addresses(DemoOptions(sip=("::1", 5060), sip6="::1"))


def test_kamailio_gets_ipv6_listen_addresses_in_brackets() -> None:
    kam = KamailioProcess("127.0.0.1", 5060, "127.0.0.1", 8448, "n", "127.0.0.1", Path("/tmp"), sip6_host="::1")
    command = kam.command()
    assert "EVW_SIP_IP=127.0.0.1" in command and "EVW_SIP_IP6=[::1]" in command
    only6 = KamailioProcess("::1", 5060, "127.0.0.1", 8448, "n", "::1", Path("/tmp")).command()
    assert "EVW_SIP_IP=[::1]" in only6
    assert bracketed("2001:db8::1") == "[2001:db8::1]" and bracketed("192.0.2.1") == "192.0.2.1"
