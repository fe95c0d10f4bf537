"""Commits: the position after the last answered record of each owned partition.

A record counts as answered once its completed or failed event was acknowledged (see
:class:`~consumers.tracking.PartitionTracker`). Commits run in the background whenever
something new was answered, back off while the broker struggles, and never name a
partition this member no longer owns.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from consumers.tracking import PartitionTracker

__all__ = ["Committer", "partition_names"]

logger = logging.getLogger(__name__)


class Committer:
    """The trackers of the owned partitions and the commits made from them."""

    def __init__(self, consumer: AIOKafkaConsumer, *,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self._consumer = consumer
        self._sleep = sleep
        self._trackers: dict[TopicPartition, PartitionTracker] = {}
        self._wanted = asyncio.Event()
        self._lock = asyncio.Lock()

    # --- ownership ---

    def own(self, partitions: Iterable[TopicPartition]) -> None:
        for tp in partitions:
            self._trackers.setdefault(tp, PartitionTracker())

    def disown(self, partitions: Iterable[TopicPartition]) -> None:
        for tp in partitions:
            self._trackers.pop(tp, None)

    def tracker(self, tp: TopicPartition) -> PartitionTracker | None:
        """The tracker of an owned partition; None once it is not ours."""
        return self._trackers.get(tp)

    @property
    def owned(self) -> list[TopicPartition]:
        return list(self._trackers)

    # --- commits ---

    def want(self) -> None:
        """Something was answered: commit soon."""
        self._wanted.set()

    async def run(self) -> None:
        """Commits whenever wanted, until cancelled."""
        failures = 0
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            if await self.commit(self.owned):
                failures = 0
            else:  # the broker is struggling: back off before the next try
                failures += 1
                await self._sleep(min(5.0, 0.1 * 2**failures))

    async def commit(self, partitions: list[TopicPartition]) -> bool:
        """Commits what is answered in ``partitions``; False when the broker failed (the
        commit is then wanted again)."""
        async with self._lock:
            offsets = {}
            for tp in partitions:
                tracker = self._trackers.get(tp)
                position = tracker.committable() if tracker is not None else None
                if position is not None:
                    offsets[tp] = position
            if not offsets:
                return True
            try:
                await self._consumer.commit(offsets)
            except (CommitFailedError, IllegalStateError) as exc:
                # Membership changed: the partitions are being moved; the revoke callback
                # commits what is ours, anything else is redelivered to the next owner.
                logger.warning("commit of %s skipped: %s", partition_names(offsets), exc)
                return True
            except KafkaError as exc:
                logger.warning("commit of %s failed, will retry: %s",
                               partition_names(offsets), exc)
                self._wanted.set()
                return False
            for tp, position in offsets.items():
                tracker = self._trackers.get(tp)
                if tracker is not None:
                    tracker.mark_committed(position)
            return True


def partition_names(partitions: Iterable[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(partitions)) or "none"
