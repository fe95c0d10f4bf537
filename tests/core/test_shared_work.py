"""Work shared by the callers asking for the same key (core/shared_work.py): joined while
in progress, cancelled with its last caller unless that caller's ``keep_when_abandoned``
says the request comes again."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from core.shared_work import SharedWork

WAIT = 10.0


class Job:
    """Work that waits for ``release``; records whether it finished or was cancelled."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.ended = asyncio.Event()
        self.calls = 0
        self.finished = False
        self.cancelled = False

    async def __call__(self) -> str:
        self.calls += 1
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        finally:
            self.ended.set()
        self.finished = True
        return "made"


async def abandon(work: SharedWork[str], job: Job,
                  keep: Callable[[], bool] | None) -> None:
    """One caller starts ``job`` and is cancelled while it runs."""
    caller = asyncio.create_task(work.run("k", job, keep_when_abandoned=keep))
    await asyncio.wait_for(job.started.wait(), WAIT)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller


async def test_callers_of_one_key_share_one_piece_of_work() -> None:
    work: SharedWork[str] = SharedWork("image")
    job = Job()
    callers = [asyncio.create_task(work.run("k", job)) for _ in range(3)]
    await asyncio.wait_for(job.started.wait(), WAIT)
    assert work.running("k") and not work.running("other")
    job.release.set()
    assert await asyncio.wait_for(asyncio.gather(*callers), WAIT) == ["made"] * 3
    assert job.calls == 1 and len(work) == 0


@pytest.mark.parametrize("keep", [None, lambda: False], ids=["no-hook", "hook-says-no"])
async def test_work_abandoned_by_its_last_caller_is_cancelled(
    keep: Callable[[], bool] | None,
) -> None:
    work: SharedWork[str] = SharedWork()
    job = Job()
    await abandon(work, job, keep)
    await asyncio.wait_for(job.ended.wait(), WAIT)
    assert job.cancelled and not work.running("k")


async def test_work_kept_when_abandoned_goes_on_and_a_later_caller_joins_it() -> None:
    work: SharedWork[str] = SharedWork()
    job = Job()
    asked: list[bool] = []

    def comes_again() -> bool:
        asked.append(True)
        return True

    await abandon(work, job, comes_again)
    assert asked == [True] and work.running("k") and not job.cancelled
    later = asyncio.create_task(work.run("k", Job()))  # the request's next delivery
    job.release.set()
    assert await asyncio.wait_for(later, WAIT) == "made"
    assert job.calls == 1 and job.finished


async def test_the_hook_is_asked_only_when_the_last_caller_leaves() -> None:
    work: SharedWork[str] = SharedWork()
    job = Job()
    asked: list[bool] = []

    def never() -> bool:
        asked.append(True)
        return False

    staying = asyncio.create_task(work.run("k", job))
    await asyncio.wait_for(job.started.wait(), WAIT)
    leaving = asyncio.create_task(work.run("k", job, keep_when_abandoned=never))
    await asyncio.sleep(0)  # one turn of the loop (no timing): the new task joins
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert asked == [] and not job.cancelled  # another caller still waits
    job.release.set()
    assert await asyncio.wait_for(staying, WAIT) == "made"
