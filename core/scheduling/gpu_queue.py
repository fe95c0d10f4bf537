"""The GPU worker's queue: interactive before background, owners in turn, batches within.

Items are jobs, exclusive calls (LoRA training chunks), or the stop mark. Each priority
keeps a FIFO per owner (``placement.owner``, a conversation) and the owners' turn order: the
owner after the one served last goes next, and a new owner joins at the end of the turn.
So one owner's ten jobs do not hold back another owner's one, and a training, whose chunks
form their own owner, yields between chunks.

:meth:`WorkQueue.take` picks the next item of the highest priority queued. An exclusive
call comes alone. A job leads a batch: compatible jobs of the same priority join it, in turn
order across owners, waiting up to the batch window for more. If higher-priority work
arrives during that wait, the selection starts over (nothing was removed yet, so the
gathered jobs keep their places), so a background batch never delays interactive work by
more than the call already running.

A background item whose placement is promoted (:class:`~core.scheduling.placement.Promotion`:
a live request of its conversation waits behind it) moves to the interactive line, at the
end of its owner's FIFO there, and takes its owner's turn among interactive work.

Items whose future is cancelled are dropped; items past their deadline when they would be
taken are answered :class:`~schemas.errors.RequestExpiredError` and never returned. Both the
deadline and the promotion are read as they are then: a job shared by several requests
(``placement.joint``, :class:`~core.scheduling.placement.JointPlacement`) expires only past
the latest of their deadlines, and is promoted once one of them is interactive.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from core.scheduling.placement import Placement, Priority
from schemas.errors import RequestExpiredError

if TYPE_CHECKING:  # the image package imports this one: no import back at run time
    from core.image.job import ImageJob

__all__ = [
    "BatchKeyFn", "ExclusiveItem", "Item", "JobItem", "SizeFn", "StopItem", "Work", "WorkQueue",
]

BatchKeyFn = Callable[["ImageJob"], Hashable]
"""Jobs with equal keys can share one pipeline call (:func:`core.image.job.batch_key`)."""
SizeFn = Callable[["ImageJob"], int]
"""How many images a job adds to a batch (its ``count``; 1 when not given)."""


@dataclass(eq=False)
class JobItem:
    """A job and its future. ``cancelled`` is set when its caller withdraws it while it
    runs (a queued one is dropped through ``future.cancel()`` instead)."""

    job: ImageJob
    future: Future[Any]
    placement: Placement = field(default_factory=Placement)
    cancelled: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.monotonic)

    def withdraw(self) -> None:
        """Nobody wants the result: drop the job if queued, else mark it so that its
        pipeline call stops at the next step once no job in it is wanted."""
        if not self.future.cancel():
            self.cancelled.set()


@dataclass(eq=False)
class ExclusiveItem:
    """``fn(pipeline)`` to run alone in the worker thread, between jobs."""

    fn: Callable[[Any], Any]
    future: Future[Any]
    placement: Placement = field(default_factory=Placement)


@dataclass(eq=False)
class StopItem:
    """The stop mark: taken once nothing else is queued."""


Item = JobItem | ExclusiveItem | StopItem
Work = ExclusiveItem | StopItem | list[JobItem]
_Queued = JobItem | ExclusiveItem
_EXPIRED = "not started by its deadline"


class WorkQueue:
    """Thread-safe; any thread puts, the worker thread takes. ``batch_key`` says which
    jobs may share a pipeline call; ``size`` how many images a job adds to it (a batch
    holds at most ``max_batch`` images, and a job's own images always go together: one
    larger than that runs alone, so its producer bounds it; the GPU worker refuses jobs of
    more than MAX_BATCH_SIZE images)."""

    def __init__(self, batch_key: BatchKeyFn, size: SizeFn | None = None) -> None:
        self._key = batch_key
        self._size: SizeFn = size or (lambda _job: 1)
        self._lanes = {priority: _Lane() for priority in sorted(Priority, key=_rank)}
        self._stop: StopItem | None = None
        self._changed = threading.Condition()

    def put(self, item: Item) -> None:
        with self._changed:
            if isinstance(item, StopItem):
                self._stop = item
            else:
                self._lanes[item.placement.priority_now()].add(item)
            self._changed.notify_all()
        if isinstance(item, StopItem) or item.placement.promotion is None:
            return
        if item.placement.priority_now() is Priority.BACKGROUND:
            queued = item
            item.placement.promotion.watch(lambda: self._promote(queued))

    def _promote(self, item: _Queued) -> None:
        """Moves ``item``, while queued as background, to the interactive line."""
        with self._changed:
            background = self._lanes[Priority.BACKGROUND]
            if background.holds(item):
                background.remove([item])
                self._lanes[Priority.INTERACTIVE].add(item)
                self._changed.notify_all()  # a background batch window starts over

    def depth(self) -> dict[Priority, int]:
        """Items queued and not started, per priority (withdrawn ones not counted)."""
        with self._changed:
            return {priority: sum(not item.future.done() for item in lane)
                    for priority, lane in self._lanes.items()}

    def drain(self) -> list[Item]:
        """Remove and return everything queued, the stop mark included."""
        with self._changed:
            items: list[Item] = []
            for lane in self._lanes.values():
                items.extend(lane)
                lane.clear()
            if self._stop is not None:
                items.append(self._stop)
                self._stop = None
            return items

    def take(self, max_batch: int, window_s: float) -> Work:
        """Block for the next work: an exclusive call; a batch of up to ``max_batch``
        compatible jobs of one priority, gathered until the batch is full or its lead job
        has waited ``window_s`` seconds since it was queued (a job that already waited
        behind other work does not wait again, nor does any once stop is queued); or the
        stop mark, once nothing else is queued."""
        while True:
            expired: list[_Queued] = []
            with self._changed:
                work = self._select(max_batch, window_s, expired)
            for item in expired:  # outside the lock: futures run their callbacks here
                if item.future.set_running_or_notify_cancel():
                    item.future.set_exception(RequestExpiredError(_EXPIRED))
            if work is not None:
                return work

    def _select(self, max_batch: int, window_s: float, expired: list[_Queued]) -> Work | None:
        """Under the lock: the work to return, or ``None`` once ``expired`` has items to
        answer first."""
        while True:
            lane = next((lane for lane in self._lanes.values() if lane), None)
            if lane is None:
                if self._stop is not None:
                    return self._stop
                self._changed.wait()
                continue
            picked = self._pick(lane, max_batch, expired)
            if expired:
                return None
            if not picked:
                continue  # the lane held only withdrawn items: look again
            lead = picked[0]
            if isinstance(lead, ExclusiveItem):
                lane.commit(picked)
                return lead
            remaining = lead.queued_at + window_s - time.monotonic()
            if self._images(picked) >= max_batch or remaining <= 0 or self._stop is not None:
                lane.commit(picked)
                return [item for item in picked if isinstance(item, JobItem)]
            self._changed.wait(remaining)  # then pick again: new work may change the choice

    def _pick(self, lane: _Lane, max_batch: int, expired: list[_Queued]) -> list[_Queued]:
        """The lead item and, for a job, its batch in turn order, without removing them;
        withdrawn and expired items met on the way are removed (expired ones into
        ``expired``)."""
        dead: list[_Queued] = []
        judged: set[_Queued] = set()  # each item is judged (and answered) once

        def live(item: _Queued) -> bool:
            if item in judged:
                return False
            if item.future.done():
                dead.append(item)
            elif item.placement.expired():
                expired.append(item)
            else:
                return True
            judged.add(item)
            return False

        picked: list[_Queued] = []
        turns = list(lane.turns)
        for index, owner in enumerate(turns):
            lead = next((item for item in lane.fifos[owner] if live(item)), None)
            if lead is not None:
                picked.append(lead)
                turns = turns[index + 1:] + turns[:index + 1]  # the lead's owner comes last
                break
        if picked and isinstance(picked[0], JobItem):
            self._gather(lane, picked, turns, max_batch, live)
        lane.remove(dead + expired)
        return picked

    def _gather(self, lane: _Lane, picked: list[_Queued], turns: list[str], max_batch: int,
                live: Callable[[_Queued], bool]) -> None:
        """Adds compatible jobs to ``picked``, one per owner per round, owners in turn, while
        their images fit in ``max_batch`` (an owner whose next job does not fit is done:
        its jobs keep their order)."""
        lead = picked[0]
        assert isinstance(lead, JobItem)
        key = self._key(lead.job)
        images = self._images(picked)
        candidates = {
            owner: self._compatible(lane.fifos[owner], key,
                                    after=lead if owner == lead.placement.owner else None)
            for owner in turns
        }
        while images < max_batch and turns:
            for owner in list(turns):
                item = next((item for item in candidates[owner] if live(item)), None)
                if item is None or images + self._size(item.job) > max_batch:
                    turns.remove(owner)
                    continue
                picked.append(item)
                images += self._size(item.job)
                if images >= max_batch:
                    return

    def _images(self, picked: list[_Queued]) -> int:
        return sum(self._size(item.job) for item in picked if isinstance(item, JobItem))

    def _compatible(self, fifo: list[_Queued], key: Hashable,
                    after: JobItem | None) -> Iterator[JobItem]:
        """The jobs of ``fifo`` (from ``after`` on) with batch key ``key``, in order."""
        start = fifo.index(after) + 1 if after is not None else 0
        for item in fifo[start:]:
            if isinstance(item, JobItem) and self._key(item.job) == key:
                yield item


class _Lane:
    """One priority's items: a FIFO per owner, and the owners with items in turn order."""

    def __init__(self) -> None:
        self.fifos: dict[str, list[_Queued]] = {}
        self.turns: list[str] = []

    def __bool__(self) -> bool:
        return bool(self.turns)

    def __iter__(self) -> Iterator[_Queued]:
        for owner in self.turns:
            yield from self.fifos[owner]

    def holds(self, item: _Queued) -> bool:
        return item in self.fifos.get(item.placement.owner, ())

    def add(self, item: _Queued) -> None:
        owner = item.placement.owner
        if owner not in self.fifos:
            self.fifos[owner] = []
            self.turns.append(owner)
        self.fifos[owner].append(item)

    def commit(self, picked: list[_Queued]) -> None:
        """Removes ``picked`` (in service order); the owners served move to the end of the
        turn, behind those not served, the one served last at the very end (so the owner
        after it in the turn goes next)."""
        self.remove(picked)
        last_served = {item.placement.owner: index for index, item in enumerate(picked)}
        served = sorted(last_served, key=last_served.__getitem__)
        self.turns = ([owner for owner in self.turns if owner not in served]
                      + [owner for owner in served if owner in self.fifos])

    def remove(self, items: list[_Queued]) -> None:
        gone = set(items)
        for owner in {item.placement.owner for item in items}:
            kept = [item for item in self.fifos[owner] if item not in gone]
            if kept:
                self.fifos[owner] = kept
            else:
                del self.fifos[owner]
                self.turns.remove(owner)

    def clear(self) -> None:
        self.fifos.clear()
        self.turns.clear()


def _rank(priority: Priority) -> int:
    return priority.rank
