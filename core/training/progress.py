"""Training steps (reported in the GPU worker thread) → progress listeners on the loop.

Throttled: the first step of a run (after a start or a resume, so a resumed training says
at once where it resumed), then at most one report per ``interval`` seconds, and always
the last step. Reports reach every listener in order (one drain task); a listener's error
is logged, never raised: progress is best effort, the result is what counts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

__all__ = ["ProgressFanout", "ProgressListener"]

logger = logging.getLogger(__name__)

ProgressListener = Callable[[int, int, float | None], Awaitable[None]]


class ProgressFanout:
    """Progress of one training of ``total`` steps. ``on_report(step, loss)`` is called on
    the loop for each report, before the listeners (the status board)."""

    def __init__(self, total: int, interval: float,
                 on_report: Callable[[int, float | None], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._total = total
        self._interval = interval
        self._on_report = on_report
        self._listeners: list[ProgressListener] = []
        self._queue: asyncio.Queue[tuple[int, float | None] | None] = asyncio.Queue()
        self._last = float("-inf")
        self._first = True
        self._task = self._loop.create_task(self._drain())

    def add(self, listener: ProgressListener) -> None:
        self._listeners.append(listener)

    def remove(self, listener: ProgressListener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def step(self, step: int, loss: float | None) -> None:
        """Called from the worker thread after each step (cheap when throttled away)."""
        now = time.monotonic()
        if not (self._first or step >= self._total or now - self._last >= self._interval):
            return
        self._first = False
        self._last = now
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (step, loss))
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    async def aclose(self) -> None:
        """Deliver what is queued, then stop."""
        self._queue.put_nowait(None)
        await self._task

    async def _drain(self) -> None:
        while (item := await self._queue.get()) is not None:
            step, loss = item
            self._on_report(step, loss)
            for listener in list(self._listeners):
                try:
                    await listener(step, self._total, loss)
                except Exception:
                    logger.warning("training progress not delivered", exc_info=True)
