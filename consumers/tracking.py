"""Offset bookkeeping per partition: what may be committed.

Records of one partition finish out of order (different conversations run concurrently),
but Kafka commits a single position per partition. Records are fetched in offset order, so
every fetched offset below the smallest one still pending is answered: that smallest
pending offset (or one past the last fetched when none is pending) is the position to
commit. Gaps in offsets (compaction, transaction markers) need no special care.
"""

from __future__ import annotations

__all__ = ["PartitionTracker"]


class PartitionTracker:
    """Tracks fetched and answered offsets of one owned partition."""

    def __init__(self) -> None:
        self._pending: set[int] = set()
        self._last_fetched: int | None = None
        self._committed: int | None = None

    def fetched(self, offset: int) -> None:
        """Registers a record handed to work."""
        self._pending.add(offset)
        self._last_fetched = offset

    def finished(self, offset: int) -> None:
        """Marks a record as answered (its result event acknowledged by the broker)."""
        self._pending.discard(offset)

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def position(self) -> int | None:
        """The offset of the next record not yet answered, or None before any fetch."""
        if self._pending:
            return min(self._pending)
        return None if self._last_fetched is None else self._last_fetched + 1

    def committable(self) -> int | None:
        """The position to commit now, or None when nothing new is answered."""
        position = self.position()
        if position is None or (self._committed is not None and position <= self._committed):
            return None
        return position

    def mark_committed(self, position: int) -> None:
        self._committed = position
