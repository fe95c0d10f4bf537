"""Pending requests: cancels by id or conversation, remembered for late arrivals, deadlines."""

from __future__ import annotations

import asyncio
import time

import pytest

from core.scheduling import PendingRequests, Priority, effective_priority, supervise
from schemas.errors import RequestCancelledError, RequestExpiredError

I, B = Priority.INTERACTIVE, Priority.BACKGROUND


def test_cancel_by_id_marks_that_request_only() -> None:
    pending = PendingRequests()
    one = pending.add("r1", "conv", "image", I)
    two = pending.add("r2", "conv", "image", I)
    assert pending.cancel("conv", "r1") == [one]
    assert one.cancelled.is_set() and not two.cancelled.is_set()
    assert pending.cancel("other-conv", "r2") == []  # a cancel names its conversation


def test_cancel_of_a_conversation_marks_what_was_published_before_it() -> None:
    pending = PendingRequests()
    old = pending.add("r1", "conv", "image", I, published_at=100.0)
    newer = pending.add("r2", "conv", "voice", I, published_at=300.0)
    other = pending.add("r3", "elsewhere", "image", I, published_at=100.0)
    assert pending.cancel("conv", None, issued_at=200.0) == [old]
    assert not newer.cancelled.is_set() and not other.cancelled.is_set()


def test_a_cancel_that_arrives_first_still_applies_for_a_while() -> None:
    now = [1000.0]
    pending = PendingRequests(remember_seconds=60, clock=lambda: now[0])
    pending.cancel("conv", "late-request")
    pending.cancel("whole", None, issued_at=1000.0)
    assert pending.add("late-request", "conv", "image", I).cancelled.is_set()
    assert pending.add("x", "whole", "voice", I, published_at=999.0).cancelled.is_set()
    assert not pending.add("y", "whole", "voice", I, published_at=1001.0).cancelled.is_set()
    now[0] += 61  # forgotten: a replay next week regenerates
    assert not pending.add("late-request", "conv", "image", I).cancelled.is_set()


def test_remembered_cancels_are_bounded() -> None:
    pending = PendingRequests(remember_seconds=3600, max_remembered=100)
    for i in range(1000):
        pending.cancel("conv", f"r{i}")
    assert not pending.add("r0", "conv", "image", I).cancelled.is_set()  # evicted, oldest first
    assert pending.add("r999", "conv", "image", I).cancelled.is_set()


def test_depths_count_requests_until_they_start() -> None:
    waits: list[tuple[str, Priority, float]] = []
    pending = PendingRequests(on_queue_wait=lambda *w: waits.append(w))
    a = pending.add("a", "c1", "image", I)
    pending.add("b", "c2", "image", B)
    assert pending.depths()["image"] == {"interactive": 1, "background": 1}
    a.mark_started()
    a.mark_started()  # once
    assert pending.depths()["image"] == {"interactive": 0, "background": 1}
    assert len(waits) == 1 and waits[0][:2] == ("image", I)
    pending.remove(a)
    pending.remove(a)
    assert pending.find("a") == []


async def test_a_request_keeping_its_work_stays_cancellable_until_released() -> None:
    pending = PendingRequests()
    request = pending.add("r1", "conv", "image", I)
    assert request.keeps() and request.kept  # revoked while its work runs: kept
    assert pending.find("r1") == [request]  # a DELETE /requests/r1 still finds it here
    dropped = asyncio.ensure_future(request.dropped())
    assert pending.cancel("conv", "r1") == [request]
    await asyncio.wait_for(dropped, timeout=2)  # its kept work is told to stop
    request.released()  # that work ended
    assert pending.find("r1") == []


def test_a_cancelled_or_answered_request_keeps_nothing() -> None:
    pending = PendingRequests()
    cancelled = pending.add("r1", "conv", "image", I)
    pending.cancel("conv", "r1")
    answered = pending.add("r2", "conv", "image", I)
    pending.remove(answered)
    assert not cancelled.keeps() and not answered.keeps()
    assert not cancelled.kept and not answered.kept


def test_old_records_count_as_background_unless_they_say_otherwise() -> None:
    now = 10_000.0
    assert effective_priority(None, published_at=now - 5, created_at=None, replay_age=600,
                              now=now) is I
    assert effective_priority(None, published_at=now - 3600, created_at=None, replay_age=600,
                              now=now) is B
    # re-published old events: their creation time tells
    assert effective_priority(None, published_at=now, created_at=now - 3600, replay_age=600,
                              now=now) is B
    assert effective_priority("interactive", published_at=now - 3600, created_at=None,
                              replay_age=600, now=now) is I


async def test_supervise_stops_work_on_cancel_and_releases_it() -> None:
    pending = PendingRequests()
    request = pending.add("r", "c", "voice", I)
    released = asyncio.Event()

    async def work() -> str:
        try:
            await asyncio.Event().wait()
        finally:
            released.set()
        return "never"

    running = asyncio.create_task(supervise(request, work()))
    await asyncio.sleep(0)
    pending.cancel("c", "r")
    with pytest.raises(RequestCancelledError):
        await asyncio.wait_for(running, timeout=2)
    assert released.is_set()


async def test_supervise_expires_work_not_started_by_its_deadline() -> None:
    pending = PendingRequests()
    past = pending.add("r1", "c", "voice", I, deadline=time.time() - 1)
    ran: list[str] = []

    async def work(name: str, start: bool = False) -> str:
        ran.append(name)
        if start:
            request.mark_started()
        await asyncio.sleep(0.3)  # work that outlives the deadline
        return name

    with pytest.raises(RequestExpiredError):
        await supervise(past, work("past"))
    assert ran == []  # never begun

    request = pending.add("r2", "c", "voice", I, deadline=time.time() + 0.1)
    with pytest.raises(RequestExpiredError):
        await asyncio.wait_for(supervise(request, work("queued")), timeout=2)

    request = pending.add("r3", "c", "voice", I, deadline=time.time() + 0.1)
    assert await asyncio.wait_for(supervise(request, work("started", start=True)),
                                  timeout=2) == "started"  # started in time: it finishes


async def test_a_start_racing_the_deadline_still_gets_an_answer() -> None:
    pending = PendingRequests()
    request = pending.add("r", "c", "image", I, deadline=time.time() + 0.05)

    async def work() -> str:
        try:
            await asyncio.Event().wait()
        finally:
            request.mark_started()  # the GPU took it just as the deadline passed
        return "never"

    with pytest.raises(RequestExpiredError):  # an answer, never a bare cancellation
        await asyncio.wait_for(supervise(request, work()), timeout=2)


async def test_a_cancel_wins_over_a_result_arriving_with_it() -> None:
    pending = PendingRequests()
    request = pending.add("r", "c", "voice", I)

    async def work() -> str:
        pending.cancel("c", "r")  # the cancel lands as the work finishes
        return "done"

    with pytest.raises(RequestCancelledError):
        await supervise(request, work())


def test_a_cancel_from_a_clock_ahead_applies_from_now() -> None:
    now = [1000.0]
    pending = PendingRequests(remember_seconds=60, clock=lambda: now[0])
    pending.cancel("conv", None, issued_at=5000.0)  # a producer's clock far ahead
    assert pending.add("a", "conv", "voice", I, published_at=999.0).cancelled.is_set()
    assert not pending.add("b", "conv", "voice", I, published_at=1001.0).cancelled.is_set()
    now[0] += 61
    assert not pending.add("c", "conv", "voice", I, published_at=900.0).cancelled.is_set()


def test_a_promoted_request_waits_and_is_placed_as_interactive() -> None:
    pending = PendingRequests()
    replay = pending.add("r", "victim", "image", B)
    placement = replay.placement()
    assert placement.priority_now() is B and pending.depths()["image"]["background"] == 1
    replay.promote()
    replay.promote()  # once
    assert replay.priority is I and placement.priority_now() is I
    assert pending.depths()["image"] == {"interactive": 1, "background": 0}
    replay.mark_started()
    assert pending.depths()["image"] == {"interactive": 0, "background": 0}
