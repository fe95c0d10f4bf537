"""How the group's partitions are spread over the instances: balanced per topic, sticky.

Round robin (aiokafka's default) moves most partitions whenever an instance joins or
leaves. Kafka's sticky assignor keeps them, but balances the *total* count per member: with
three request topics, one instance may end up with every image partition and another with
every voice partition, so one GPU idles while the other's queue grows. The engine wants
both: every topic spread evenly (each member gets ⌊n/k⌋ or ⌈n/k⌉ of each topic's
partitions), and, within that, every partition left where it was.

Each member reports what it holds in its JoinGroup metadata (``user_data``: JSON
``{topic: [partitions]}``); the leader keeps every member's partitions up to its share of
each topic (the larger shares going to those who held more) and hands out the rest. The
state is the consumer's own (an instance per consumer, not class attributes), and a
member that restarts reports nothing (with static membership a quick restart is not even
a rebalance).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.protocol import (
    ConsumerProtocolMemberAssignment,
    ConsumerProtocolMemberMetadata,
)

__all__ = ["BalancedStickyAssignor"]

logger = logging.getLogger(__name__)


class BalancedStickyAssignor(AbstractPartitionAssignor):  # type: ignore[misc]
    """One per consumer: see the module docstring."""

    name = "balanced-sticky"
    version = 0

    def __init__(self) -> None:
        self._held: dict[str, list[int]] = {}

    def metadata(self, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
        return ConsumerProtocolMemberMetadata(
            self.version, sorted(topics), json.dumps(self._held).encode())

    def on_assignment(self, assignment: ConsumerProtocolMemberAssignment) -> None:
        self._held = {}
        for tp in assignment.partitions():
            self._held.setdefault(tp.topic, []).append(tp.partition)

    def assign(self, cluster: Any, members: Mapping[str, ConsumerProtocolMemberMetadata]
               ) -> dict[str, ConsumerProtocolMemberAssignment]:
        held = {member: _held(meta.user_data) for member, meta in members.items()}
        result: dict[str, dict[str, list[int]]] = {member: {} for member in members}
        for topic in sorted({t for meta in members.values() for t in meta.subscription}):
            partitions = cluster.partitions_for_topic(topic)
            if not partitions:
                logger.warning("no partitions known for topic %s: not assigned", topic)
                continue
            subscribers = sorted(m for m, meta in members.items() if topic in meta.subscription)
            for member, mine in _spread(sorted(partitions), subscribers,
                                        {m: held[m].get(topic, []) for m in subscribers}
                                        ).items():
                if mine:
                    result[member][topic] = mine
        return {member: ConsumerProtocolMemberAssignment(
                    self.version, sorted(topics.items()), b"")
                for member, topics in result.items()}


def _spread(partitions: list[int], members: list[str], held: dict[str, list[int]]
            ) -> dict[str, list[int]]:
    """One topic's ``partitions`` over ``members``: balanced (shares differ by one at most),
    each keeping what it ``held`` up to its share."""
    base, extra = divmod(len(partitions), len(members))
    # the larger shares to those who held more: fewer partitions move
    by_held = sorted(members, key=lambda m: (-len(held[m]), m))
    share = {m: base + (1 if i < extra else 0) for i, m in enumerate(by_held)}
    free = set(partitions)
    kept: dict[str, list[int]] = {}
    for member in by_held:
        mine = [p for p in held[member] if p in free][:share[member]]
        free.difference_update(mine)
        kept[member] = mine
    rest = sorted(free)
    for member in members:
        while len(kept[member]) < share[member]:
            kept[member].append(rest.pop(0))
        kept[member].sort()
    return kept


def _held(user_data: bytes | None) -> dict[str, list[int]]:
    """A member's reported partitions; anything unreadable reports nothing."""
    try:
        data = json.loads(user_data or b"{}")
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(topic): [p for p in parts if isinstance(p, int)]
            for topic, parts in data.items() if isinstance(parts, list)}
