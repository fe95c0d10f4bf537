"""Flow control: how much each kind may hold in memory, and pausing only that kind.

Every fetched record stays in memory until it is answered: the ones at work and the ones
waiting for their turn (their conversation's order, a free slot of their kind). Per kind,
when the records held reach ``max_records`` or their bytes ``max_bytes``, the kind's
partitions are paused; they resume at half. A full image kind therefore never stops voice
from being fetched.
"""

from __future__ import annotations

import logging
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
    paused: bool = False


class FlowControl:
    """Counts what each kind holds; pauses and resumes the kind's partitions."""

    def __init__(self, consumer: AIOKafkaConsumer, kinds: Mapping[str, str],
                 limits: FlowLimits, health: EngineHealth) -> None:
        """``kinds`` maps each input topic to its kind; ``health`` shows the paused kinds."""
        self._consumer = consumer
        self._health = health
        self._kinds = dict(kinds)
        self._limits = limits
        self._held = {kind: _Held() for kind in set(kinds.values())}

    def took(self, kind: str, size: int) -> None:
        held = self._held[kind]
        held.records += 1
        held.bytes += size

    def let_go(self, kind: str, size: int) -> None:
        held = self._held[kind]
        held.records -= 1
        held.bytes -= size

    def room(self) -> int:
        """Records the next fetch may bring without passing any unpaused kind's bound."""
        open_kinds = [h for h in self._held.values() if not h.paused]
        if not open_kinds:
            return 1
        return max(1, min(self._limits.max_records - h.records for h in open_kinds))

    def apply(self, owned: Iterable[TopicPartition], *, restate: bool = False) -> None:
        """Pauses the partitions of kinds at their bound, resumes those back at half.
        ``restate`` after an assignment: the consumer forgets pauses across rebalances."""
        changed = []
        for kind, held in self._held.items():
            full = (held.records >= self._limits.max_records
                    or held.bytes >= self._limits.max_bytes)
            low = (held.records <= self._limits.max_records // 2
                   and held.bytes <= self._limits.max_bytes // 2)
            if (full and not held.paused) or (held.paused and low):
                held.paused = not held.paused
                changed.append(kind)
                logger.info("%s fetching %s: %d records (%d bytes) held",
                            "paused" if held.paused else "resumed", kind, held.records,
                            held.bytes)
        if changed:
            self._show()
        if not changed and not restate:
            return
        assigned = set(self._consumer.assignment())
        for tp in owned:
            of = self._kinds.get(tp.topic)
            if tp not in assigned or of is None or not (restate or of in changed):
                continue
            if self._held[of].paused:
                self._consumer.pause(tp)
            else:
                self._consumer.resume(tp)

    def _show(self) -> None:
        self._health.paused_kinds = sorted(k for k, h in self._held.items() if h.paused)
