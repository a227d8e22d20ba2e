"""Fair fake-call slots: round-robin between accounts, a share per account."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from evapi_worker.slots import FairSlots


async def test_waiting_accounts_are_served_in_turn_not_in_arrival_order() -> None:
    slots = FairSlots(total=1, per_key=10)
    order: list[str] = []
    async with trio.open_nursery() as nursery:
        await slots.acquire("first")

        async def one(key: str) -> None:
            await slots.acquire(key)
            order.append(key)
            await trio.sleep(0.01)
            slots.release(key)

        for _ in range(4):  # a ring group: four calls of one account arrive first...
            nursery.start_soon(one, "group")
            await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(one, "alone")  # ...then one of another account
        await trio.testing.wait_all_tasks_blocked()
        assert slots.waiting == 5
        slots.release("first")
    assert order == ["group", "alone", "group", "group", "group"]
    assert slots.borrowed == 0 and slots.waiting == 0


async def test_an_account_holds_at_most_its_share_and_others_pass_it() -> None:
    slots = FairSlots(total=10, per_key=3)
    for _ in range(3):
        await slots.acquire("noisy")
    with trio.move_on_after(0.05) as scope:
        await slots.acquire("noisy")  # its fourth waits, though seven slots are free
    assert scope.cancelled_caught and slots.capped == 1
    await slots.acquire("quiet")  # another account is not delayed
    assert slots.held("noisy") == 3 and slots.held("quiet") == 1 and slots.waiting == 0


async def test_a_cancelled_waiter_leaves_nothing_held_or_queued() -> None:
    slots = FairSlots(total=1, per_key=1)
    await slots.acquire("a")
    async with trio.open_nursery() as nursery:

        async def gives_up() -> None:
            with trio.move_on_after(0.01):
                await slots.acquire("b")

        nursery.start_soon(gives_up)
    assert slots.waiting == 0
    slots.release("a")
    assert slots.borrowed == 0
    await slots.acquire("b")
    assert slots.held("b") == 1


async def test_a_waiter_cancelled_as_its_slot_is_handed_over_holds_it_only_if_it_returned() -> None:
    slots = FairSlots(total=1, per_key=1)
    await slots.acquire("a")
    got: list[bool] = []

    async def waiter() -> None:
        try:
            await slots.acquire("b")
        except trio.Cancelled:
            got.append(False)
            raise
        got.append(True)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        slots.release("a")  # granted to b...
        nursery.cancel_scope.cancel()  # ...which is cancelled before it runs
    assert len(got) == 1
    assert slots.held("b") == slots.borrowed == (1 if got[0] else 0)


def test_releasing_a_slot_not_held_is_an_error() -> None:
    with pytest.raises(RuntimeError):
        FairSlots(total=1, per_key=1).release("x")


async def test_try_acquire_takes_a_free_slot_at_once_and_never_jumps_the_queue() -> None:
    slots = FairSlots(total=2, per_key=1)
    assert slots.try_acquire("a")
    assert not slots.try_acquire("a")  # its share
    assert slots.try_acquire("b")
    assert not slots.try_acquire("c")  # none left
    async with trio.open_nursery() as nursery:
        nursery.start_soon(slots.acquire, "c")
        await trio.testing.wait_all_tasks_blocked()
        slots.release("a")  # handed to the waiting "c"
        assert not slots.try_acquire("a")
        assert slots.held("c") == 1 and slots.borrowed == 2


async def test_the_waiting_account_that_holds_the_fewest_goes_first() -> None:
    slots = FairSlots(total=4, per_key=4)
    for key in ("rude", "rude", "rude", "polite"):
        await slots.acquire(key)
    order: list[str] = []
    async with trio.open_nursery() as nursery:

        async def one(key: str) -> None:
            await slots.acquire(key)
            order.append(key)

        nursery.start_soon(one, "rude")  # rude waited first...
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(one, "polite")  # ...but polite holds one to its three
        await trio.testing.wait_all_tasks_blocked()
        slots.release("rude")
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["polite"]
        slots.release("rude")
    assert order == ["polite", "rude"]


async def test_an_account_with_nothing_in_flight_takes_a_reserved_slot_when_rude_ones_hold_all() -> None:
    slots = FairSlots(total=40, per_key=10, reserve=4)
    for n in range(4):  # four rude accounts: every slot
        for _ in range(10):
            assert slots.try_acquire(f"rude-{n}")
    assert not slots.try_acquire("rude-0")
    with trio.move_on_after(0.05) as scope:
        await slots.acquire("rude-1")
    assert scope.cancelled_caught
    for n in range(4):  # each polite account's first late phone goes at once...
        assert slots.try_acquire(f"polite-{n}")
    assert not slots.try_acquire("polite-0")  # ...its second waits, as any other
    assert not slots.try_acquire("polite-5")  # and the reserve is a bound too
    assert slots.borrowed == 44
    # Freed slots go to whoever holds none first (into the reserve), then
    # to the fewest held once the slots in use are under the total again.
    order: list[str] = []
    async with trio.open_nursery() as nursery:

        async def one(key: str) -> None:
            await slots.acquire(key)
            order.append(key)

        for key in ("rude-0", "polite-0", "polite-5"):
            nursery.start_soon(one, key)
            await trio.testing.wait_all_tasks_blocked()
        releases = []
        for n in range(7):
            slots.release(f"rude-{n % 4}")
            await trio.testing.wait_all_tasks_blocked()
            releases.append(len(order))
    assert order == ["polite-5", "polite-0", "rude-0"]
    assert releases == [1, 1, 1, 1, 1, 2, 3]
