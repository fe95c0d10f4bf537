"""A training's stop request: set by the event loop (a revoked record, the engine
stopping), read by the worker thread between steps, and awaited by the loop, so that a
chunk still waiting for its turn on the GPU is dropped at once instead of waiting for the
work ahead of it only to stop there."""

from __future__ import annotations

import asyncio
import threading


class StopSignal(threading.Event):
    """A :class:`threading.Event` that event loops can also :meth:`wait_async` for."""

    def __init__(self) -> None:
        super().__init__()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._guard = threading.Lock()

    def set(self) -> None:
        with self._guard:
            super().set()
            waiters, self._waiters = self._waiters, []
        for loop, waiter in waiters:
            if not loop.is_closed():
                loop.call_soon_threadsafe(_resolve, waiter)

    async def wait_async(self) -> None:
        """Return once the signal is set (at once when it is)."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        with self._guard:
            if self.is_set():
                return
            self._waiters.append((loop, waiter))
        try:
            await waiter
        finally:
            with self._guard:
                if (loop, waiter) in self._waiters:
                    self._waiters.remove((loop, waiter))


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
