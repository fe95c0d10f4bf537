"""One piece of work for every caller that asks for the same thing at the same time.

A redelivered record, a replay racing the original, or the same request over Kafka and
HTTP: while an output (an image, a voice file) is being made, a second caller with the
same key waits for that work instead of computing it, or paying the upstream, twice. The
work belongs to no single caller: it goes on while anyone still waits. When the last
waiting caller is cancelled, the work is cancelled too, unless that caller's
``keep_when_abandoned`` says it should finish anyway (a request that will come again: its
result lands where the work keeps it, a result cache, for that next delivery).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["SharedWork"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(eq=False)
class _Work(Generic[T]):
    task: asyncio.Task[T]
    waiters: int = 0


class SharedWork(Generic[T]):
    """Work in progress by key; ``name`` says what it makes, in log lines. Used from one
    event loop."""

    def __init__(self, name: str = "work") -> None:
        self._name = name
        self._work: dict[str, _Work[T]] = {}

    def __len__(self) -> int:
        return len(self._work)

    def running(self, key: str) -> bool:
        """Whether work for ``key`` is in progress (a caller would join it)."""
        work = self._work.get(key)
        return work is not None and not work.task.done() and not work.task.cancelling()

    async def run(self, key: str, make: Callable[[], Awaitable[T]], *,
                  keep_when_abandoned: Callable[[], bool] | None = None) -> T:
        """The result of the work for ``key``: joined when in progress, else ``make()``
        started as a task of its own. Raises what the work raised.

        Cancelling this caller cancels the work only when no other caller waits for it
        and ``keep_when_abandoned`` (asked then) is absent or returns False; when it
        returns True the work goes on alone, and a caller that comes later joins it."""
        work = self._work.get(key)
        if work is None or work.task.done() or work.task.cancelling():  # not a dying one
            work = _Work(asyncio.ensure_future(make()))
            self._work[key] = work
            work.task.add_done_callback(lambda _: self._ended(key, work))
        else:
            logger.info("a request joins the same %s being made", self._name)
        work.waiters += 1
        try:
            return await asyncio.shield(work.task)
        except asyncio.CancelledError:
            if work.waiters == 1 and not work.task.done():
                if keep_when_abandoned is not None and keep_when_abandoned():
                    logger.info("an abandoned %s is still made: it is kept for the "
                                "request's next delivery", self._name)
                else:
                    work.task.cancel()
            raise
        finally:
            work.waiters -= 1

    def _ended(self, key: str, work: _Work[T]) -> None:
        if self._work.get(key) is work:
            del self._work[key]
        if not work.task.cancelled() and work.task.exception() is not None \
                and work.waiters == 0:
            logger.warning("abandoned %s failed: %s", self._name, work.task.exception())
