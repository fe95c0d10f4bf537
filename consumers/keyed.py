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
        self._tails: dict[Hashable, asyncio.Task[None]] = {}

    def submit(
        self, key: Hashable, work: Callable[[], Awaitable[None]]
    ) -> asyncio.Task[None]:
        """Schedules ``work`` after every earlier submission with the same key.

        The returned task finishes when ``work`` does; a failed or cancelled predecessor
        (even one cancelled before it ever ran) does not stop its successors.
        """
        previous = self._tails.get(key)

        async def run() -> None:
            if previous is not None and not previous.done():
                # the predecessor's own task reports its errors; only its end matters here
                await asyncio.wait({previous})
            await work()

        task = asyncio.get_running_loop().create_task(run())
        self._tails[key] = task

        def forget(finished: asyncio.Task[None]) -> None:
            if self._tails.get(key) is finished:
                del self._tails[key]

        task.add_done_callback(forget)
        return task

    @property
    def active_keys(self) -> int:
        return len(self._tails)

