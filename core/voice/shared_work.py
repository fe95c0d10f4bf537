"""One piece of work for every caller that asks for the same thing at the same time.

A redelivered record, a replay racing the original, or the same request over Kafka and
HTTP: while a voice output is being made, a second caller with the same key waits for that
work instead of paying ElevenLabs twice. The work belongs to no single caller: it goes on
while anyone still waits and is cancelled when the last waiting caller is.
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
    """Work in progress by key. Used from one event loop."""

    def __init__(self) -> None:
        self._work: dict[str, _Work[T]] = {}

    def __len__(self) -> int:
        return len(self._work)

    def running(self, key: str) -> bool:
        """Whether work for ``key`` is in progress (a caller would join it)."""
        work = self._work.get(key)
        return work is not None and not work.task.done()

    async def run(self, key: str, make: Callable[[], Awaitable[T]]) -> T:
        """The result of the work for ``key``: joined when in progress, else ``make()``
        started as a task of its own. Raises what the work raised; cancelling this caller
        cancels the work only when no other caller waits for it."""
        work = self._work.get(key)
        if work is None or work.task.done() or work.task.cancelling():  # not a dying one
            work = _Work(asyncio.ensure_future(make()))
            self._work[key] = work
            work.task.add_done_callback(lambda _: self._ended(key, work))
        else:
            logger.info("a request joins the same voice output being made")
        work.waiters += 1
        try:
            return await asyncio.shield(work.task)
        except asyncio.CancelledError:
            if work.waiters == 1 and not work.task.done():
                work.task.cancel()
            raise
        finally:
            work.waiters -= 1

    def _ended(self, key: str, work: _Work[T]) -> None:
        if self._work.get(key) is work:
            del self._work[key]
        if not work.task.cancelled() and work.task.exception() is not None \
                and work.waiters == 0:
            logger.warning("abandoned voice work failed: %s", work.task.exception())
