"""Flow control: how much each kind may hold in memory, and pausing only the partitions
that fill it.

Every fetched record stays in memory until it is answered: the ones at work and the ones
waiting for their turn (their conversation's order, a free slot of their kind). Per kind,
when the records held reach ``max_records`` or their bytes ``max_bytes``, the kind is full,
and only its partitions holding their fair share or more are paused: the share is the bound
divided by the kind's owned partitions (at least one record, one byte). The other partitions
keep fetching, so one conversation's flood (or a replay's backlog on a few partitions) never
stops a quiet conversation on another partition, and a full image kind never stops voice.
A paused partition resumes once it holds half its share or less, or its kind half its bound.

The bound: below its bound a kind's fetch brings at most what takes it to the bound; while
it is full, a fetch brings at most what takes each open partition to its share (and half a
share while some are paused: one may resume during the fetch), see :meth:`FlowControl.room`.
So from the moment a kind reaches its bound, each partition holds at most the larger of its
share and what it held then, and a kind holds at most ``max_records + max(max_records, P)``
records, ``P`` its owned partitions (``2 * max_records`` when ``max_records >= P``), for as
long as its assignment stays the same. Bytes likewise, except that a fetch is bounded in
records, not bytes: one fetch may pass a byte bound or share by what it brings.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition

from core.health import EngineHealth

__all__ = ["FlowControl", "FlowLimits"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FlowLimits:
    max_records: int = 1000
    max_bytes: int = 64 * 2**20

    def __post_init__(self) -> None:
        if self.max_records < 1:
            raise ValueError(f"MAX_BUFFERED_RECORDS must be >= 1, got {self.max_records}")
        if self.max_bytes < 1:
            raise ValueError(f"MAX_BUFFERED_BYTES must be >= 1, got {self.max_bytes}")


@dataclass
class _Held:
    records: int = 0
    bytes: int = 0


@dataclass(frozen=True)
class _Share:
    records: int
    bytes: int


class FlowControl:
    """Counts what each kind and partition holds; pauses and resumes partitions."""

    def __init__(self, consumer: AIOKafkaConsumer, kinds: Mapping[str, str],
                 limits: FlowLimits, health: EngineHealth) -> None:
        """``kinds`` maps each input topic to its kind; ``health`` shows the kinds with a
        paused partition."""
        self._consumer = consumer
        self._health = health
        self._kinds = dict(kinds)
        self._limits = limits
        self._held = {kind: _Held() for kind in set(kinds.values())}
        self._partitions: dict[TopicPartition, _Held] = {}  # those holding records
        self._owned: list[TopicPartition] = []  # as of the last apply
        self._paused: set[TopicPartition] = set()
        self._shares = {kind: _Share(limits.max_records, limits.max_bytes)
                        for kind in self._held}  # per partition, as of the last apply

    def took(self, tp: TopicPartition, size: int) -> None:
        """A record of ``tp`` (``size`` bytes) is held from now on."""
        for held in (self._held[self._kinds[tp.topic]],
                     self._partitions.setdefault(tp, _Held())):
            held.records += 1
            held.bytes += size

    def let_go(self, tp: TopicPartition, size: int) -> None:
        """A record :meth:`took` is no longer held."""
        held = self._partitions[tp]
        for h in (self._held[self._kinds[tp.topic]], held):
            h.records -= 1
            h.bytes -= size
        if not held.records:
            del self._partitions[tp]

    def room(self) -> int:
        """Records the next fetch may bring (at least 1): for a kind below its bound, no
        more than takes it to its bound; for a full kind, no more than takes any of its open
        partitions to its share, nor, while some are paused, half a share (one may resume
        while the fetch is under way, holding half its share)."""
        limits = []
        for kind, held in self._held.items():
            if not self._full(held):
                limits.append(self._limits.max_records - held.records)
                continue
            share = self._shares[kind].records
            of_kind = [tp for tp in self._owned if self._kinds[tp.topic] == kind]
            limits += [share - self._holds(tp).records for tp in of_kind
                       if tp not in self._paused]
            if any(tp in self._paused for tp in of_kind):
                limits.append(share - share // 2)
        return max(1, min(limits, default=1))

    def apply(self, owned: Iterable[TopicPartition], *, restate: bool = False) -> None:
        """Pauses the partitions holding their share or more of a full kind, resumes those
        back at half their share (or whose kind is back at half its bound). ``restate``
        after an assignment: the consumer forgets pauses across rebalances."""
        self._owned = [tp for tp in owned if tp.topic in self._kinds]
        partitions = Counter(self._kinds[tp.topic] for tp in self._owned)
        self._shares = {kind: _Share(max(1, self._limits.max_records // (partitions[kind] or 1)),
                                     max(1, self._limits.max_bytes // (partitions[kind] or 1)))
                        for kind in self._held}
        was_paused = set(self._paused)
        self._paused &= set(self._owned)  # not ours any more: nothing to pause or resume
        changed = [tp for tp in self._owned if self._flips(tp)]
        for tp in changed:
            self._paused ^= {tp}
            kind = self._kinds[tp.topic]
            logger.info("%s fetching %s[%d]: it holds %d records (%d bytes); %s holds %d "
                        "(%d bytes)", "paused" if tp in self._paused else "resumed", tp.topic,
                        tp.partition, self._holds(tp).records, self._holds(tp).bytes, kind,
                        self._held[kind].records, self._held[kind].bytes)
        if self._paused != was_paused:
            self._health.paused_kinds = sorted({self._kinds[tp.topic] for tp in self._paused})
        assigned = set(self._consumer.assignment())
        for tp in self._owned if restate else changed:
            if tp not in assigned:
                continue
            if tp in self._paused:
                self._consumer.pause(tp)
            else:
                self._consumer.resume(tp)

    def _flips(self, tp: TopicPartition) -> bool:
        """Whether ``tp`` is to be resumed (when paused) or paused (when not)."""
        kind = self._kinds[tp.topic]
        share, held, of_kind = self._shares[kind], self._holds(tp), self._held[kind]
        if tp in self._paused:
            return self._low(of_kind) or (held.records <= share.records // 2
                                          and held.bytes <= share.bytes // 2)
        return self._full(of_kind) and (held.records >= share.records
                                        or held.bytes >= share.bytes)

    def _holds(self, tp: TopicPartition) -> _Held:
        return self._partitions.get(tp) or _Held()

    def _full(self, held: _Held) -> bool:
        return (held.records >= self._limits.max_records
                or held.bytes >= self._limits.max_bytes)

    def _low(self, held: _Held) -> bool:
        return (held.records <= self._limits.max_records // 2
                and held.bytes <= self._limits.max_bytes // 2)
