"""Per-key ordering with concurrency across keys.

Two requests with the same key (one conversation) run one after the other in fetch order;
requests with different keys run concurrently, even inside one partition.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable

__all__ = ["KeyedSerializer"]


class KeyedSerializer:
    """Chains coroutines per key: each starts when the previous one of its key ends."""

    def __init__(self) -> None:
        self._tails: dict[Hashable, asyncio.Future[None]] = {}

    def submit(
        self, key: Hashable, work: Callable[[], Awaitable[None]]
    ) -> asyncio.Task[None]:
        """Schedules ``work`` after every earlier submission with the same key.

        The returned task finishes when ``work`` does; a failed or cancelled predecessor
        does not stop its successors.
        """
        previous = self._tails.get(key)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._tails[key] = done

        async def run() -> None:
            try:
                if previous is not None and not previous.done():
                    await _wait_quietly(previous)
                await work()
            finally:
                if not done.done():
                    done.set_result(None)
                if self._tails.get(key) is done:
                    del self._tails[key]

        return asyncio.get_running_loop().create_task(run())

    @property
    def active_keys(self) -> int:
        return len(self._tails)


async def _wait_quietly(future: asyncio.Future[None]) -> None:
    # The predecessor's own task reports its errors; here only its end matters.
    await asyncio.wait({future})
