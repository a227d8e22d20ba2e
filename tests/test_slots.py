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
