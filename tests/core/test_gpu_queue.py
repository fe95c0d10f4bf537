"""The GPU worker's queue on its own, with plain jobs: priority, owners in turn, batching
within a priority, preemption of a batch window, deadlines, cancellation, stop."""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable
from concurrent.futures import Future
from dataclasses import replace
from typing import Any

import pytest

from core.image.job import ImageJob, batch_key
from core.scheduling.gpu_queue import ExclusiveItem, Item, JobItem, StopItem, Work, WorkQueue
from core.scheduling.placement import Placement, Priority, Promotion
from schemas.errors import ErrorCode, RequestExpiredError

WAIT = 30.0  # seconds; a generous bound for any wait, never a sleep
BACKGROUND = Priority.BACKGROUND


def job(seed: int = 1, **changes: Any) -> ImageJob:
    base = ImageJob(prompt="a photo", negative_prompt=None, width=64, height=64, steps=4,
                    guidance=3.5, true_cfg_scale=1.0, seed=seed, lora=None)
    return replace(base, **changes)


def item(seed: int = 1, owner: str = "", priority: Priority = Priority.INTERACTIVE,
         deadline: float | None = None, **changes: Any) -> JobItem:
    placement = Placement(priority=priority, owner=owner, deadline=deadline)
    return JobItem(job(seed, **changes), Future(), placement)


def exclusive(owner: str, deadline: float | None = None) -> ExclusiveItem:
    return ExclusiveItem(lambda _pipeline: None, Future(), Placement(owner=owner,
                                                                     deadline=deadline))


def seeds(work: Work) -> list[int]:
    assert isinstance(work, list), work
    return [entry.job.seed for entry in work]


def queue_of(*items: Item) -> WorkQueue:
    queue = WorkQueue(batch_key)
    for entry in items:
        queue.put(entry)
    return queue


def test_interactive_goes_before_background_and_they_never_share_a_batch() -> None:
    queue = queue_of(item(1, priority=BACKGROUND), item(2, priority=BACKGROUND), item(3))
    assert queue.depth() == {Priority.INTERACTIVE: 1, Priority.BACKGROUND: 2}
    assert seeds(queue.take(8, 0)) == [3]
    assert seeds(queue.take(8, 0)) == [1, 2]
    assert queue.depth() == {Priority.INTERACTIVE: 0, Priority.BACKGROUND: 0}


def test_owners_take_turns_so_one_owners_many_jobs_do_not_hold_back_others() -> None:
    many = [item(seed, owner="chatty") for seed in range(10)]
    queue = queue_of(*many, item(100, owner="quiet"), item(200, owner="shy"))
    order = [seeds(queue.take(1, 0))[0] for _ in range(12)]
    assert order[:4] == [0, 100, 200, 1]
    assert order[4:] == list(range(2, 10))


def test_a_new_owner_joins_the_turn_at_its_end() -> None:
    queue = queue_of(item(1, owner="a"), item(2, owner="a"), item(3, owner="b"))
    assert seeds(queue.take(1, 0)) == [1]  # a served: the turn is now b, a
    queue.put(item(4, owner="c"))
    assert [seeds(queue.take(1, 0))[0] for _ in range(3)] == [3, 2, 4]


def test_compatible_jobs_batch_across_owners_in_turn_within_one_priority() -> None:
    queue = queue_of(
        item(1, owner="a"), item(2, owner="a"), item(3, owner="a"),
        item(4, owner="b", width=80),  # incompatible: waits for its own batch
        item(5, owner="b"), item(6, owner="c"), item(7, owner="c"),
        item(8, owner="d", priority=BACKGROUND),  # compatible, but background
    )
    assert seeds(queue.take(4, 0)) == [1, 5, 6, 2]  # a, b, c, then a again
    # a was served last: b, the owner after it, leads with its 80 px job
    assert seeds(queue.take(4, 0)) == [4]
    assert seeds(queue.take(4, 0)) == [7, 3]
    assert seeds(queue.take(4, 0)) == [8]


def test_exclusive_calls_come_alone_and_take_turns_with_jobs() -> None:
    first, second = exclusive("training:t1"), exclusive("training:t1")
    queue = queue_of(first, second, item(1, owner="chat"), item(2, owner="chat"))
    assert queue.take(4, 0) is first
    assert seeds(queue.take(4, 0)) == [1, 2]  # the training yields between its chunks
    assert queue.take(4, 0) is second


def test_interactive_work_arriving_in_a_background_batch_window_goes_first() -> None:
    looked_at: dict[int, threading.Event] = {1: threading.Event(), 9: threading.Event()}

    def key(image_job: ImageJob) -> Hashable:
        if image_job.seed in looked_at:  # the taker chose this lead and looks for company
            looked_at[image_job.seed].set()
        return batch_key(image_job)

    queue = WorkQueue(key)
    for entry in (item(1, owner="a", priority=BACKGROUND), item(2, owner="b", priority=BACKGROUND),
                  item(3, owner="a", priority=BACKGROUND)):
        queue.put(entry)
    taken: list[Work] = []
    taker = threading.Thread(target=lambda: taken.append(queue.take(8, 3600)), daemon=True)
    taker.start()
    assert looked_at[1].wait(WAIT)
    queue.put(item(9, owner="c", width=80))  # the taker waits for company, lock released
    assert looked_at[9].wait(WAIT)  # the selection started over, led by the interactive job
    stop = StopItem()
    queue.put(stop)  # ends the interactive job's own window: a stopping queue does not wait
    taker.join(WAIT)
    assert not taker.is_alive()
    assert seeds(taken[0]) == [9]
    # the background jobs kept their places and their turn order
    assert seeds(queue.take(8, 3600)) == [1, 2, 3]
    assert queue.take(8, 3600) is stop


def test_jobs_past_their_deadline_are_answered_expired_and_never_taken() -> None:
    past = time.time() - 1
    late_lead, late_mate = item(1, owner="a", deadline=past), item(2, owner="b", deadline=past)
    late_call = exclusive("training:t", deadline=past)
    queue = queue_of(late_call, late_lead, item(3, owner="a"), late_mate,
                     item(4, owner="b", deadline=time.time() + 3600))
    assert seeds(queue.take(8, 0)) == [3, 4]
    for late in (late_lead, late_mate, late_call):
        with pytest.raises(RequestExpiredError) as caught:
            late.future.result(0)
        assert caught.value.code == ErrorCode.EXPIRED
    assert queue.depth() == {Priority.INTERACTIVE: 0, Priority.BACKGROUND: 0}


def test_cancelled_items_are_skipped() -> None:
    dropped: list[JobItem | ExclusiveItem] = [item(1, owner="a"), item(2, owner="b"),
                                              exclusive("training:t")]
    kept = item(3, owner="a")
    queue = queue_of(dropped[2], dropped[0], kept, dropped[1])
    for entry in dropped:
        assert entry.future.cancel()
    assert queue.depth()[Priority.INTERACTIVE] == 1
    assert seeds(queue.take(8, 0)) == [3]
    queue.put(StopItem())
    assert isinstance(queue.take(8, 0), StopItem)


def test_stop_comes_after_everything_queued_without_waiting_for_a_window() -> None:
    stop = StopItem()
    queue = queue_of(item(1), stop, item(2, width=80, priority=BACKGROUND))
    started = time.monotonic()
    assert seeds(queue.take(8, 3600)) == [1]
    assert seeds(queue.take(8, 3600)) == [2]
    assert time.monotonic() - started < WAIT  # a stopping queue gathers what is there
    assert queue.take(8, 3600) is stop


def test_drain_returns_everything_queued() -> None:
    entries: list[Item] = [item(1), item(2, priority=BACKGROUND), exclusive("training:t"),
                           StopItem()]
    queue = queue_of(*entries)
    assert set(queue.drain()) == set(entries)
    assert queue.drain() == []


def test_a_promoted_background_job_takes_its_owners_turn_among_interactive_ones() -> None:
    # a live request of "victim" waits behind its replay: the replay runs at its priority
    promotion = Promotion()
    replay = JobItem(job(9), Future(),
                     Placement(priority=BACKGROUND, owner="victim", promotion=promotion))
    queue = queue_of(*(item(seed, owner="a") for seed in (1, 2, 3)),
                     *(item(seed, owner="b") for seed in (4, 5, 6)), replay)
    assert seeds(queue.take(1, 0)) == [1]
    promotion.set()
    assert queue.depth() == {Priority.INTERACTIVE: 6, Priority.BACKGROUND: 0}
    # the turn was b, a; victim joins at its end, ahead of a's and b's later jobs
    assert [seeds(queue.take(1, 0))[0] for _ in range(6)] == [4, 2, 9, 5, 3, 6]

