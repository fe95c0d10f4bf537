"""Work shared by the callers asking for the same key (core/shared_work.py): joined while
in progress, cancelled with its last caller unless that caller's keeper keeps it (the
request comes again); kept work stops once no keeper wants it any more (the request was
cancelled), and its keepers are released when it ends, however."""

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


class Keep:
    """A caller's keeper (:class:`core.shared_work.Keeper`): keeps the work when ``wanted``
    until :meth:`drop`; records how often it was asked and released."""

    def __init__(self, wanted: bool = True) -> None:
        self.wanted = wanted
        self.asked = 0
        self.releases = 0
        self.released_once = asyncio.Event()
        self.drop_seen = asyncio.Event()  # set as dropped() returns to its watcher
        self._dropped = asyncio.Event()

    def keeps(self) -> bool:
        self.asked += 1
        return self.wanted

    async def dropped(self) -> None:
        await self._dropped.wait()
        self.drop_seen.set()

    def released(self) -> None:
        self.releases += 1
        self.released_once.set()

    def drop(self) -> None:
        self._dropped.set()


async def leave(caller: asyncio.Task[str]) -> None:
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller


async def abandon(work: SharedWork[str], job: Job, keep: Keep | None) -> None:
    """One caller starts ``job`` and is cancelled while it runs."""
    caller = asyncio.create_task(work.run("k", job, keep_when_abandoned=keep))
    await asyncio.wait_for(job.started.wait(), WAIT)
    await leave(caller)


async def join(work: SharedWork[str], job: Job, keep: Keep | None = None
               ) -> asyncio.Task[str]:
    """A caller that joins the work in progress for ``k``."""
    caller = asyncio.create_task(work.run("k", job, keep_when_abandoned=keep))
    await asyncio.sleep(0)  # one turn of the loop (no timing): the new task joins
    return caller


async def test_callers_of_one_key_share_one_piece_of_work() -> None:
    work: SharedWork[str] = SharedWork("image")
    job = Job()
    callers = [asyncio.create_task(work.run("k", job)) for _ in range(3)]
    await asyncio.wait_for(job.started.wait(), WAIT)
    assert work.running("k") and not work.running("other")
    job.release.set()
    assert await asyncio.wait_for(asyncio.gather(*callers), WAIT) == ["made"] * 3
    assert job.calls == 1 and len(work) == 0


@pytest.mark.parametrize("keep", [lambda: None, lambda: Keep(wanted=False)],
                         ids=["no-keeper", "keeper-says-no"])
async def test_work_abandoned_by_its_last_caller_is_cancelled(
    keep: Callable[[], Keep | None],
) -> None:
    work: SharedWork[str] = SharedWork()
    job = Job()
    keeper = keep()
    await abandon(work, job, keeper)
    await asyncio.wait_for(job.ended.wait(), WAIT)
    assert job.cancelled and not work.running("k")
    assert keeper is None or keeper.releases == 0  # not kept: nothing to release


async def test_work_kept_when_abandoned_goes_on_and_a_later_caller_joins_it() -> None:
    work: SharedWork[str] = SharedWork()
    job = Job()
    keep = Keep()
    await abandon(work, job, keep)
    assert keep.asked == 1 and work.running("k") and not job.cancelled
    later = await join(work, Job())  # the request's next delivery
    job.release.set()
    assert await asyncio.wait_for(later, WAIT) == "made"
    assert job.calls == 1 and job.finished
    assert keep.releases == 1  # released when the work ended


async def test_the_keeper_is_asked_only_when_the_last_caller_leaves() -> None:
    work: SharedWork[str] = SharedWork()
    job = Job()
    staying = asyncio.create_task(work.run("k", job))
    await asyncio.wait_for(job.started.wait(), WAIT)
    keep = Keep(wanted=False)
    await leave(await join(work, job, keep))
    assert keep.asked == 0 and not job.cancelled  # another caller still waits
    job.release.set()
    assert await asyncio.wait_for(staying, WAIT) == "made"


async def test_kept_work_stops_once_its_keeper_is_dropped_and_releases_it() -> None:
    work: SharedWork[str] = SharedWork()
    job = Job()
    keep = Keep()
    await abandon(work, job, keep)
    keep.drop()  # its request was cancelled
    await asyncio.wait_for(job.ended.wait(), WAIT)
    assert job.cancelled and not job.finished and not work.running("k")
    await asyncio.wait_for(keep.released_once.wait(), WAIT)
    assert keep.releases == 1 and len(work) == 0


async def test_a_dropped_keeper_leaves_the_work_to_a_caller_still_waiting_for_it() -> None:
    work: SharedWork[str] = SharedWork()
    job = Job()
    keep = Keep()
    await abandon(work, job, keep)
    waiting = await join(work, job)  # an HTTP request for the same image, say
    keep.drop()
    await asyncio.wait_for(keep.drop_seen.wait(), WAIT)
    assert not job.cancelled and work.running("k")
    await leave(waiting)  # its client goes away too: nobody wants the work any more
    await asyncio.wait_for(job.ended.wait(), WAIT)
    assert job.cancelled and keep.releases == 1


async def test_work_kept_by_two_callers_stops_only_when_both_are_dropped() -> None:
    work: SharedWork[str] = SharedWork()
    job = Job()
    first, second = Keep(), Keep()
    await abandon(work, job, first)
    await leave(await join(work, job, second))  # joined by the next delivery, revoked too
    assert second.asked == 1
    first.drop()
    await asyncio.wait_for(first.drop_seen.wait(), WAIT)
    assert not job.cancelled  # the second still wants it
    second.drop()
    await asyncio.wait_for(job.ended.wait(), WAIT)
    assert job.cancelled
    await asyncio.wait_for(second.released_once.wait(), WAIT)
    assert (first.releases, second.releases) == (1, 1)


async def test_keepers_are_released_when_kept_work_fails() -> None:
    work: SharedWork[str] = SharedWork()
    failing = asyncio.Event()
    keep = Keep()

    async def make() -> str:
        await failing.wait()
        raise RuntimeError("the upstream broke")

    caller = asyncio.create_task(work.run("k", make, keep_when_abandoned=keep))
    await asyncio.sleep(0)  # one turn of the loop: the work starts
    await leave(caller)
    failing.set()
    await asyncio.wait_for(keep.released_once.wait(), WAIT)
    assert keep.releases == 1 and len(work) == 0
