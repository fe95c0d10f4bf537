"""``multimodal-engine replay``: publish a time window of a request topic again.

The way to regenerate after a model or LoRA change, without touching the engine's
consumer group. Each record whose Kafka timestamp lies in ``[since, until)`` goes back to
its own topic and partition with its key, value, headers and *original* timestamp, plus
``replayed-from: topic/partition/offset`` and ``replayed-at`` (when the copy was sent, epoch
milliseconds). The engine sees such a record as old (older than ``REPLAY_AGE_SECONDS``) and
schedules it as background work, and it answers from its remembered results unless the
model or LoRA changed; a conversation's cancel reaches the copy only when issued after
``replayed-at`` (:func:`copy_published_at`).

Bounded on every side: the range of each partition is pinned before anything is published
(from the offset for ``since`` up to the end offset of that moment, or the offset for
``until``), so the replay never reads what it publishes; records are read and published a
batch at a time; the consumer is in no group and commits nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Self

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

__all__ = [
    "REPLAYED_AT",
    "REPLAYED_FROM",
    "PartitionRange",
    "PartitionReplay",
    "ReplayError",
    "ReplaySummary",
    "ReplayWindow",
    "Replayer",
    "TopicNotFoundError",
    "copy_published_at",
]

#: The header a replayed record carries: ``topic/partition/offset`` of its original.
REPLAYED_FROM = "replayed-from"
#: The header a replayed record carries: when the replay sent it (epoch milliseconds).
REPLAYED_AT = "replayed-at"


def copy_published_at(headers: Iterable[tuple[str, bytes | None]] | None, *, now: float
                      ) -> float | None:
    """When a replayed copy was published (epoch seconds), for matching the cancels of its
    conversation (its timestamp is its original's): its ``replayed-at`` header; ``now`` for
    a copy without a usable one (an older replay's: it was published by the time it is
    read); ``None`` for a record that is no replayed copy."""
    pairs = list(headers or ())
    if not any(name == REPLAYED_FROM for name, _ in pairs):
        return None
    for name, value in pairs:
        if name == REPLAYED_AT and value is not None:
            try:
                sent = int(value.decode("ascii")) / 1000
            except (UnicodeDecodeError, ValueError):
                return now
            return sent if sent > 0 else now
    return now


class ReplayError(Exception):
    """The replay could not finish; the message says why and how far it got."""


class TopicNotFoundError(ReplayError):
    """The topic does not exist on the broker (a wrong ``KAFKA_TOPIC_PREFIX``?)."""


@dataclass(frozen=True)
class ReplayWindow:
    """Records whose Kafka timestamp is in ``[since, until)`` (``until`` None: no upper
    bound but the end offsets), and whose key is one of ``keys`` when any are given.

    Raises :class:`ValueError` naming the bound when a time has no zone or ``until`` is not
    after ``since``."""

    since: datetime
    until: datetime | None = None
    keys: frozenset[bytes] = frozenset()

    def __post_init__(self) -> None:
        for name, value in (("since", self.since), ("until", self.until)):
            if value is not None and value.tzinfo is None:
                raise ValueError(f"{name} must be an aware datetime (with a zone)")
        if self.until is not None and self.until <= self.since:
            raise ValueError(f"until ({self.until.isoformat()}) must be after since "
                             f"({self.since.isoformat()})")

    @property
    def since_ms(self) -> int:
        return int(self.since.timestamp() * 1000)

    @property
    def until_ms(self) -> int | None:
        return None if self.until is None else int(self.until.timestamp() * 1000)

    def holds(self, record: ConsumerRecord[bytes, bytes]) -> bool:
        until = self.until_ms
        return (record.timestamp >= self.since_ms
                and (until is None or record.timestamp < until)
                and (not self.keys or record.key in self.keys))


@dataclass(frozen=True)
class PartitionRange:
    """The offsets ``[start, end)`` of one partition that the replay reads."""

    partition: int
    start: int
    end: int


@dataclass
class PartitionReplay:
    """What became of one partition's range: records published again, and records of the
    window that were not (no value, or a replay themselves)."""

    range: PartitionRange
    replayed: int = 0
    skipped: int = 0


@dataclass(frozen=True)
class ReplaySummary:
    topic: str
    partitions: tuple[PartitionReplay, ...]
    dry_run: bool = False

    @property
    def replayed(self) -> int:
        return sum(p.replayed for p in self.partitions)

    @property
    def skipped(self) -> int:
        return sum(p.skipped for p in self.partitions)

    def lines(self) -> list[str]:
        """One line per partition, then the total."""
        verb = "would replay" if self.dry_run else "replayed"
        lines = [f"{self.topic} partition {p.range.partition} offsets "
                 f"{p.range.start}..{p.range.end}: {verb} {p.replayed} ({p.skipped} skipped)"
                 for p in self.partitions]
        total = f"{verb} {self.replayed} records ({self.skipped} skipped) from topic {self.topic}"
        return [*lines, total + (" (dry run: nothing published)" if self.dry_run else "")]


class Replayer:
    """Publishes a window of one topic again.

    ``consumer``: in no group (``group_id=None``), not started; ``producer``: not started,
    or None for a dry run that only counts. Both are started on ``async with`` and stopped
    at its end. ``batch_records`` bounds the records held at once; ``stall_seconds`` is how
    long the partitions left may give nothing before the replay gives up on them.
    Raises :class:`ValueError` naming the argument that is out of range.
    """

    def __init__(self, consumer: AIOKafkaConsumer, producer: AIOKafkaProducer | None, *,
                 batch_records: int = 500, stall_seconds: float = 30.0) -> None:
        if batch_records < 1:
            raise ValueError(f"batch_records must be at least 1, not {batch_records}")
        if stall_seconds <= 0:
            raise ValueError(f"stall_seconds must be positive, not {stall_seconds}")
        self.consumer = consumer
        self.producer = producer
        self._batch_records = batch_records
        self._stall_seconds = stall_seconds

    async def __aenter__(self) -> Self:
        try:
            await self.consumer.start()
            if self.producer is not None:
                await self.producer.start()
        except BaseException:
            await self.__aexit__(None, None, None)  # a half-started client is closed too
            raise
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self.producer is not None:
            await self.producer.stop()
        await self.consumer.stop()

    async def bounds(self, topic: str, window: ReplayWindow) -> tuple[PartitionRange, ...]:
        """Pins each partition's range now, so nothing published later is read. Raises
        :class:`TopicNotFoundError`, and aiokafka's ``KafkaError`` when the broker fails."""
        await self.consumer.topics()  # fresh metadata
        numbers = self.consumer.partitions_for_topic(topic)
        if not numbers:
            raise TopicNotFoundError(f"no topic {topic} on the broker (check "
                                     "KAFKA_TOPIC_PREFIX)")
        partitions = [TopicPartition(topic, p) for p in sorted(numbers)]
        ends = await self.consumer.end_offsets(partitions)
        starts = await self.consumer.offsets_for_times(
            {tp: window.since_ms for tp in partitions})
        until = window.until_ms
        stops = {} if until is None else await self.consumer.offsets_for_times(
            {tp: until for tp in partitions})
        ranges = []
        for tp in partitions:
            end = ends[tp]
            found = starts[tp]
            start = end if found is None else min(found.offset, end)
            stop = stops.get(tp)
            # the offset for ``until`` only narrows the range: a broker that answers every
            # time lookup with the first offset (Tansu does) is read to the end, and every
            # record is checked against the window anyway
            if stop is not None and start < stop.offset < end:
                end = stop.offset
            ranges.append(PartitionRange(tp.partition, start, end))
        return tuple(ranges)

    async def replay(self, topic: str, ranges: tuple[PartitionRange, ...],
                     window: ReplayWindow) -> ReplaySummary:
        """Reads ``ranges`` (from :meth:`bounds`) and publishes the window's records again,
        a batch at a time, each batch acknowledged before the next is read. Raises
        :class:`ReplayError` when publishing fails or the partitions left stall, saying how
        far each partition got."""
        results = {r.partition: PartitionReplay(r) for r in ranges}
        todo = {TopicPartition(topic, r.partition): r for r in ranges if r.start < r.end}
        self.consumer.assign(list(todo))
        for tp, r in todo.items():
            self.consumer.seek(tp, r.start)
        progressed = time.monotonic()
        while todo:
            batches = await self.consumer.getmany(*todo, timeout_ms=500,
                                                  max_records=self._batch_records)
            sends: list[tuple[PartitionReplay, asyncio.Future[object]]] = []
            try:
                for tp, records in batches.items():
                    for record in records:
                        if record.offset >= todo[tp].end:
                            break
                        if window.holds(record):
                            await self._take(record, results[tp.partition], sends)
            finally:  # what was handed to the producer is counted when acknowledged
                await self._acknowledged(sends, results)
            if batches:
                progressed = time.monotonic()
            for tp in list(todo):
                if await self.consumer.position(tp) >= todo[tp].end:
                    self.consumer.pause(tp)
                    del todo[tp]
            if todo and time.monotonic() - progressed > self._stall_seconds:
                raise ReplayError(
                    f"nothing read from {topic} partitions "
                    f"{', '.join(str(tp.partition) for tp in todo)} for "
                    f"{self._stall_seconds:.0f}s; {_progress(results)}")
        return ReplaySummary(topic, tuple(results.values()), dry_run=self.producer is None)

    async def _take(self, record: ConsumerRecord[bytes, bytes], result: PartitionReplay,
                    sends: list[tuple[PartitionReplay, asyncio.Future[object]]]) -> None:
        headers = list(record.headers or ())
        # a tombstone asks for nothing; an earlier replay's original is in the window too
        if record.value is None or any(name == REPLAYED_FROM for name, _ in headers):
            result.skipped += 1
            return
        if self.producer is None:
            result.replayed += 1
            return
        origin = f"{record.topic}/{record.partition}/{record.offset}"
        try:
            # its own partition (whatever partitioner the original producer used) and its
            # original timestamp: the engine schedules it as the old record it is; sent now
            # (replayed-at): a conversation's earlier cancel does not reach it
            sent = str(int(time.time() * 1000)).encode()
            future: asyncio.Future[object] = await self.producer.send(
                record.topic, value=record.value, key=record.key, partition=record.partition,
                timestamp_ms=record.timestamp,
                headers=[*headers, (REPLAYED_FROM, origin.encode()), (REPLAYED_AT, sent)])
        except KafkaError as exc:
            raise ReplayError(f"publishing {origin} failed: {exc}") from exc
        sends.append((result, future))

    @staticmethod
    async def _acknowledged(sends: list[tuple[PartitionReplay, asyncio.Future[object]]],
                            results: dict[int, PartitionReplay]) -> None:
        outcomes = await asyncio.gather(*(f for _, f in sends), return_exceptions=True)
        failed = next((o for o in outcomes if isinstance(o, BaseException)), None)
        for (result, _), outcome in zip(sends, outcomes, strict=True):
            if not isinstance(outcome, BaseException):
                result.replayed += 1
        if failed is not None:
            raise ReplayError(f"publishing failed ({failed}); {_progress(results)}") \
                from failed


def _progress(results: dict[int, PartitionReplay]) -> str:
    done = ", ".join(f"partition {p}: {r.replayed}" for p, r in sorted(results.items()))
    return f"records published again before that: {done}"
