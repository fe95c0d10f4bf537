"""The consumer group's rebalance callbacks for the consume loop.

On revoke: the work of the revoked partitions gets a short grace, what is answered is
committed, the rest is dropped (the next owner redoes it) and nothing more is committed
for those partitions. On assign: new partitions are tracked and flow control is applied.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Protocol

from aiokafka import TopicPartition
from aiokafka.abc import ConsumerRebalanceListener

from consumers.committer import Committer, partition_names
from core.health import EngineHealth

__all__ = ["RebalanceHandler", "WorkOfPartitions"]

logger = logging.getLogger(__name__)


class WorkOfPartitions(Protocol):
    async def settle(self, partitions: Iterable[TopicPartition], grace: float) -> int: ...

    def drop(self, partitions: Iterable[TopicPartition]) -> None: ...


class RebalanceHandler(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, committer: Committer, work: WorkOfPartitions, health: EngineHealth,
                 *, grace: float, on_assigned: Callable[[], None]) -> None:
        self._committer = committer
        self._work = work
        self._health = health
        self._grace = grace
        self._on_assigned = on_assigned

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        owned = set(self._committer.owned)
        revoked = [tp for tp in revoked if tp in owned]
        if not revoked:
            return
        # what has begun gets a short grace; unfinished work is cancelled, never answered
        # and never committed: the next owner redoes it
        await self._work.settle(revoked, self._grace)
        await self._committer.commit(revoked)
        self._work.drop(revoked)
        self._committer.disown(revoked)
        self._refresh()
        logger.info("partitions revoked: %s", partition_names(revoked))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self._committer.own(assigned)
        self._on_assigned()
        self._refresh()
        self._health.kafka_connected = True
        logger.info("partitions assigned: %s", partition_names(assigned))

    def _refresh(self) -> None:
        self._health.assigned = [(tp.topic, tp.partition) for tp in self._committer.owned]
