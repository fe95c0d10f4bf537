"""Admission: budgets per kind, a bounded share per conversation, room kept for live work."""

from __future__ import annotations

import asyncio

import pytest

from core.scheduling import Admission, Priority, Promotion

I, B = Priority.INTERACTIVE, Priority.BACKGROUND


def test_a_full_kind_holds_back_only_that_kind() -> None:
    admission = Admission({"image": 2, "voice": 2}, per_owner=2)
    assert admission.try_acquire("image", "a", I) and admission.try_acquire("image", "b", I)
    assert not admission.try_acquire("image", "c", I)
    assert admission.try_acquire("voice", "c", I)  # voice has its own budget


def test_one_conversation_holds_only_its_share() -> None:
    admission = Admission({"voice": 10}, per_owner=2)
    assert admission.try_acquire("voice", "chatty", I)
    assert admission.try_acquire("voice", "chatty", I)
    assert not admission.try_acquire("voice", "chatty", I)
    assert admission.try_acquire("voice", "quiet", I)


def test_background_leaves_room_for_interactive() -> None:
    admission = Admission({"image": 4}, per_owner=4, background_share=0.5)
    assert admission.try_acquire("image", "replay1", B)
    assert admission.try_acquire("image", "replay2", B)
    assert not admission.try_acquire("image", "replay3", B)  # half the budget at most
    assert admission.try_acquire("image", "live", I)


async def test_waiters_are_served_interactive_first_then_conversations_in_turn() -> None:
    admission = Admission({"voice": 1}, per_owner=5)
    await admission.acquire("voice", "holder", I)
    order: list[str] = []

    async def wait(owner: str, priority: Priority, name: str) -> None:
        await admission.acquire("voice", owner, priority)
        order.append(name)
        admission.release("voice", owner, priority)

    tasks = [asyncio.create_task(wait(o, p, n)) for o, p, n in [
        ("flood", I, "f1"), ("flood", I, "f2"), ("flood", I, "f3"),
        ("replay", B, "r1"), ("quiet", I, "q1")]]
    await asyncio.sleep(0)  # every waiter is queued
    assert admission.waiting("voice") == 5
    admission.release("voice", "holder", I)
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=2)
    assert order == ["f1", "q1", "f2", "f3", "r1"]
    assert admission.in_use("voice") == 0


async def test_a_cancelled_waiter_holds_nothing() -> None:
    admission = Admission({"image": 1}, per_owner=1)
    await admission.acquire("image", "a", I)
    waiter = asyncio.create_task(admission.acquire("image", "b", I))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    admission.release("image", "a", I)
    assert admission.in_use("image") == 0 and admission.waiting("image") == 0
    assert admission.try_acquire("image", "c", I)


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="MAX_IN_FLIGHT_IMAGE"):
        Admission({"image": 0}, per_owner=1)
    with pytest.raises(ValueError, match="MAX_IN_FLIGHT_PER_CONVERSATION"):
        Admission({"image": 1}, per_owner=0)


async def test_a_conversation_at_its_share_does_not_hold_back_others() -> None:
    admission = Admission({"image": 4}, per_owner=1)
    assert admission.try_acquire("image", "a", I)
    blocked = asyncio.create_task(admission.acquire("image", "a", I))  # a's second one
    await asyncio.sleep(0)
    assert not blocked.done()
    assert admission.try_acquire("image", "b", I)  # 3 of 4 slots free: b goes
    await asyncio.wait_for(admission.acquire("image", "c", I), timeout=1)
    admission.release("image", "a", I)
    await asyncio.wait_for(blocked, timeout=1)


async def test_a_promoted_background_waiter_waits_as_interactive() -> None:
    # a live request of "victim" waits behind its background one: that one must not wait
    # for the background share
    admission = Admission({"image": 4}, per_owner=2, background_share=0.5)
    assert admission.try_acquire("image", "replay1", B)
    assert admission.try_acquire("image", "replay2", B)  # the background share is full
    promotion = Promotion()
    waiter = asyncio.create_task(admission.acquire("image", "victim", B, promotion))
    await asyncio.sleep(0)  # let it queue
    assert not waiter.done()
    promotion.set()
    assert await asyncio.wait_for(waiter, timeout=2) is I  # and it is released as such
    admission.release("image", "victim", I)
    assert not admission.try_acquire("image", "replay3", B)  # the share is as it was
    assert admission.in_use("image") == 2
