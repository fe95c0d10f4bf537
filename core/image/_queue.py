"""The GPU worker's queue: FIFO, with batches of compatible jobs gathered out of it.

Items are jobs, exclusive calls, or the stop mark. :meth:`WorkQueue.take` returns the
oldest item; when it is a job, compatible jobs queued behind it join it (skipping over
others, which keep their order), waiting up to the batch window for more to arrive.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from core.image.job import ImageJob, batch_key

__all__ = ["ExclusiveItem", "Item", "JobItem", "StopItem", "WorkQueue"]


@dataclass(eq=False)
class JobItem:
    job: ImageJob
    future: Future[Any]
    queued_at: float = field(default_factory=time.monotonic)


@dataclass(eq=False)
class ExclusiveItem:
    fn: Callable[[Any], Any]
    future: Future[Any]


@dataclass(eq=False)
class StopItem:
    pass


Item = JobItem | ExclusiveItem | StopItem


class WorkQueue:
    """Thread-safe; any thread puts, the worker thread takes."""

    def __init__(self) -> None:
        self._items: deque[Item] = deque()
        self._changed = threading.Condition()

    def put(self, item: Item) -> None:
        with self._changed:
            self._items.append(item)
            self._changed.notify_all()

    def drain(self) -> list[Item]:
        """Remove and return everything queued."""
        with self._changed:
            items = list(self._items)
            self._items.clear()
            return items

    def take(self, max_batch: int, window_s: float) -> ExclusiveItem | StopItem | list[JobItem]:
        """Block for the oldest item. A job comes back as a batch: a list of up to
        ``max_batch`` compatible jobs, the oldest first, gathered while the batch is not
        full until the oldest has waited ``window_s`` seconds since it was queued (a job
        that already waited behind other work does not wait again)."""
        with self._changed:
            while not self._items:
                self._changed.wait()
            first = self._items.popleft()
            if isinstance(first, (ExclusiveItem, StopItem)):
                return first
            batch = [first]
            key = batch_key(first.job)
            deadline = first.queued_at + window_s
            scanned = 0  # items already looked at and left in place
            while len(batch) < max_batch:
                scanned, stopping = self._collect(batch, key, max_batch, scanned)
                remaining = deadline - time.monotonic()
                if stopping or len(batch) >= max_batch or remaining <= 0:
                    break
                self._changed.wait(remaining)
            return batch

    def _collect(
        self, batch: list[JobItem], key: object, max_batch: int, start: int
    ) -> tuple[int, bool]:
        index = start
        while index < len(self._items) and len(batch) < max_batch:
            item = self._items[index]
            if isinstance(item, StopItem):
                return index, True  # never gather past the stop mark
            if isinstance(item, JobItem) and batch_key(item.job) == key:
                del self._items[index]
                batch.append(item)
            else:
                index += 1
        return index, False
