"""A crowd of late phones with real Kamailio (the bundled config), the real
``evapi-worker run`` and real SIPp phones (bench/burst.py's harness): many
at once, one account with many devices, and phones that ignore the CANCEL
beside an account that must not wait for them."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from bench.burst import account, call_id, device, devices_wake, missed_calls, platform, read_phones, run

from ..e2e_platform import needs_platform
from ..helpers import needs_redis

pytestmark = needs_platform


@pytest.mark.parametrize(
    ("redis", "transport"),
    [(False, "udp"), (False, "tcp"), pytest.param(True, "udp", marks=needs_redis)],
    ids=["evapi", "evapi-tcp-phones", "redis"],
)
async def test_three_hundred_late_iphones_at_once_each_get_exactly_one_fake_call(
    tmp_path: Path, redis: bool, transport: str
) -> None:
    # Over TCP each phone registers on a connection of its own, and its fake
    # call comes back on it.
    result = await run(
        accounts=30, devices=10, ring_delay=300, folder=tmp_path, stay_ms=6000, redis=redis, transport=transport
    )
    assert result["events_through"] == ("redis" if redis else "evapi")
    assert result["phones_transport"] == transport
    assert result["problems"] == [] and result["served"] == 300, result
    outcomes = result["worker_outcomes"]
    assert isinstance(outcomes, dict) and outcomes["completed"] == 300, outcomes


async def test_an_account_with_eighty_push_devices_has_every_one_served(tmp_path: Path) -> None:
    # One call, eighty devices: eighty fake calls with one Call-ID (SIPp holds
    # one call per Call-ID: the worker spreads them over its processes, and a
    # phone process holds one device each).
    devices = 80
    async with platform(tmp_path, defines=(f"EVW_ACCOUNT_CONTACTS={devices}",)) as (sip_port, _, _):
        await missed_calls(tmp_path, sip_port, [account(0)])
        await trio.sleep(0.5)
        phones = await devices_wake(tmp_path, sip_port, [[(account(0), device(0, d))] for d in range(devices)], 0, 8000)
        with trio.fail_after(40):
            for phone in phones:
                await phone.wait()
    crowd = read_phones([tmp_path / f"phones-{d}.log" for d in range(devices)])
    for d in range(devices):
        assert [c for c, _ in crowd.invites.get(device(0, d), [])] == [call_id(0)], device(0, d)
        assert crowd.cancels.get(device(0, d)) == [(call_id(0), "")], device(0, d)


async def test_phones_that_ignore_the_cancel_do_not_delay_another_accounts_fake_call(tmp_path: Path) -> None:
    async with platform(tmp_path) as (sip_port, _, _):
        await missed_calls(tmp_path, sip_port, [account(0), account(1)])
        await trio.sleep(0.5)
        # Eight devices of one account ring and never answer the CANCEL...
        rude = [[(account(0), device(0, d))] for d in range(8)]
        rude_phones = await devices_wake(tmp_path, sip_port, rude, 0, 15000, ignore_cancel=True, name="rude")
        await trio.sleep(1.0)
        # ...while they hold their fake calls, another account's iPhone wakes.
        [polite] = await devices_wake(tmp_path, sip_port, [[(account(1), device(1, 0))]], 300, 3000, name="polite")
        with trio.fail_after(30):
            await polite.wait()
            for phone in rude_phones:
                await phone.wait()
    crowd = read_phones([tmp_path / "polite-0.log"])
    [(got, at)] = crowd.invites[device(1, 0)]
    assert got == call_id(1)
    assert (at - crowd.registered[device(1, 0)]) / 1000 < 1.0  # not behind the eight
    assert crowd.cancels[device(1, 0)] == [(call_id(1), "")]
    rude_seen = read_phones([tmp_path / f"rude-{d}.log" for d in range(8)])
    assert all(rude_seen.invites[device(0, d)][0][0] == call_id(0) for d in range(8))
