"""``generation.control``: cancels that every engine instance acts on.

Unlike the request topics, the control topic is read by every instance in full (no
consumer group: each instance assigns itself every partition), since the request a cancel
names may be held by any of them. Reading starts ``lookback`` seconds back, so a cancel
published shortly before an instance started (or before a rebalance handed it the request)
still applies. Nothing is committed: a control record only changes what is in memory.

A malformed control record is logged and skipped: there is no request to answer for it.

It is also the read barrier of :mod:`core.scheduling.barrier`: :meth:`ControlReader.mark`
looks up the control topic's end offsets (the last stable ones: read_committed) at that
moment, and its :meth:`~ControlMark.reached` waits until the records up to them were applied,
at most ``barrier_timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from consumers.records import content_type
from core.scheduling import PendingRequests
from schemas.codec import EventCodec
from schemas.errors import InvalidRequestError, UndecodableError
from schemas.events import GenerationControl
from schemas.registry import SchemaRegistryError

__all__ = ["ControlMark", "ControlReader"]

logger = logging.getLogger(__name__)


class ControlReader:
    """Applies every control record of ``topic`` to ``pending``; ``lookups`` (started and
    stopped by the caller) looks up the end offsets for :meth:`mark`."""

    def __init__(self, consumer: AIOKafkaConsumer, topic: str, codec: EventCodec,
                 pending: PendingRequests, *, lookback: float,
                 barrier_timeout: float = 2.0, lookups: AIOKafkaConsumer | None = None
                 ) -> None:
        if barrier_timeout < 0:
            raise ValueError(f"CANCEL_BARRIER_SECONDS must be >= 0, got {barrier_timeout}")
        self._consumer = consumer
        self._lookups = lookups or consumer  # best a client of its own: see build_control_consumer
        self._topic = topic
        self._codec = codec
        self._pending = pending
        self._lookback = lookback
        self._barrier_timeout = barrier_timeout
        self._assigned: list[TopicPartition] = []
        self._has_partitions = asyncio.Event()
        self._applied: dict[TopicPartition, int] = {}  # next offset to apply, never back
        self._advanced: asyncio.Event | None = None  # set whenever ``_applied`` moves
        self.ready = asyncio.Event()
        """Set once the cancels of the last ``lookback`` seconds were applied."""

    def mark(self) -> ControlMark:
        """A read mark taken now (see :class:`ControlMark`); its offsets lookup starts at
        once, in the background (none with the barrier off: a timeout of 0)."""
        if self._barrier_timeout == 0:
            return ControlMark(self, None, 0.0)
        return ControlMark(self, asyncio.ensure_future(self._end_offsets()),
                           self._barrier_timeout)

    async def run(self) -> None:
        """Applies control records until cancelled; a broker error starts the reading
        over (after a capped backoff) rather than ending it. The consumer is started and
        stopped by the caller."""
        failures = 0
        while True:
            try:
                await self._read()
            except KafkaError as exc:
                failures += 1
                wait = min(30.0, 0.5 * 2**failures)
                logger.warning("control topic %s: %s: %s; reading again in %.1fs",
                               self._topic, type(exc).__name__, exc, wait)
                await asyncio.sleep(wait)

    async def _read(self) -> None:
        """Assigns every partition, seeks ``lookback`` back, then applies records."""
        partitions = await self._partitions()
        self._consumer.assign(partitions)
        self._assigned = partitions
        self._has_partitions.set()
        since = int((time.time() - self._lookback) * 1000)
        try:
            found = await self._consumer.offsets_for_times({tp: since for tp in partitions})
        except KafkaError as exc:  # a broker without timestamp lookups: only new cancels
            logger.warning("control topic %s: no lookup by time (%s); reading new records "
                           "only", self._topic, exc)
            found = {}
        ends = await self._consumer.end_offsets(partitions)
        for tp in partitions:
            offset = found.get(tp)
            self._consumer.seek(tp, offset.offset if offset is not None else ends[tp])
        logger.info("reading cancels from %s (%d partitions)", self._topic, len(partitions))
        while True:
            if not self.ready.is_set() and await self._caught_up(ends):
                self.ready.set()  # the recent cancels are known: requests may be taken in
            batches = await self._consumer.getmany(timeout_ms=200 if not self.ready.is_set()
                                                   else 1000)
            for records in batches.values():
                for record in records:
                    where = f"partition={record.partition} offset={record.offset}"
                    await self._writer_schema(record.value, where)
                    self._apply(record.value, record.headers, record.timestamp, where)
            await self._advance(partitions)

    async def _advance(self, partitions: list[TopicPartition]) -> None:
        """Records what was applied (the positions after the records just applied: they
        also step over transaction markers) and wakes the marks waiting for it."""
        moved = False
        for tp in partitions:
            position = await self._consumer.position(tp)
            if position > self._applied.get(tp, -1):
                self._applied[tp] = position
                moved = True
        if moved and self._advanced is not None:
            self._advanced.set()
            self._advanced = None

    async def _end_offsets(self) -> dict[TopicPartition, int]:
        # bounded: no lookup outlives its marks while the control topic is not there yet
        await asyncio.wait_for(self._has_partitions.wait(), self._barrier_timeout)
        ends: dict[TopicPartition, int] = await self._lookups.end_offsets(self._assigned)
        return ends

    async def _reach(self, ends: dict[TopicPartition, int]) -> None:
        """Returns once every partition's applied position is at ``ends`` or past it."""
        while any(self._applied.get(tp, -1) < end for tp, end in ends.items()):
            if self._advanced is None:
                self._advanced = asyncio.Event()
            await self._advanced.wait()

    async def _caught_up(self, ends: dict[TopicPartition, int]) -> bool:
        for tp, end in ends.items():
            if await self._consumer.position(tp) < end:
                return False
        return True

    async def _partitions(self) -> list[TopicPartition]:
        while True:
            # `topics()` does not fill the consumer's metadata cache, and a consumer without
            # a subscription tracks no topic: a broker that answers an empty metadata
            # request with no topics (Kafka does) would leave the cache empty for minutes.
            # Track the topic and wait for that metadata update.
            await self._consumer._client.add_topic(self._topic)
            parts = self._consumer.partitions_for_topic(self._topic)
            if parts:
                return [TopicPartition(self._topic, p) for p in sorted(parts)]
            logger.warning("control topic %s not found yet; waiting for it", self._topic)
            await asyncio.sleep(2.0)

    async def _writer_schema(self, value: bytes | None, where: str) -> None:
        """A cancel written in the Schema Registry's framing waits for its writer schema
        while the registry is out of reach (a cancel is never skipped for an outage); one
        the registry does not know is skipped by ``_apply`` as undecodable."""
        async def pause(outage: int, exc: Exception) -> None:
            logger.warning("topic=%s %s waiting for the Schema Registry (try %d): %s",
                           self._topic, where, outage, exc)
            await asyncio.sleep(min(2.0 ** min(outage, 5) * 0.1, 5.0))

        with contextlib.suppress(SchemaRegistryError):
            await self._codec.resolve_writer_waiting(value, pause)

    def _apply(self, value: bytes | None, headers: Iterable[tuple[str, bytes | None]] | None,
               timestamp: int, where: str) -> None:
        try:
            control = self._codec.decode(value, content_type(headers), GenerationControl)
        except (UndecodableError, InvalidRequestError) as exc:
            logger.warning("topic=%s %s control record skipped: %s %s", self._topic, where,
                           exc.code, exc)
            return
        issued = timestamp / 1000 if timestamp and timestamp > 0 else time.time()
        if issued < time.time() - self._lookback:
            return  # older than what is remembered (a broker's coarse time lookup)
        cancelled = self._pending.cancel(control.conversation_id, control.request_id, issued)
        logger.info("topic=%s %s request_id=%s cancel for conversation %s: %d pending "
                    "request(s) cancelled here", self._topic, where, control.request_id,
                    control.conversation_id, len(cancelled))


class ControlMark:
    """A point on ``generation.control``: the end offsets when it was taken.
    :meth:`reached` waits until the reader applied every record before them."""

    def __init__(self, reader: ControlReader,
                 lookup: asyncio.Future[dict[TopicPartition, int]] | None,
                 timeout: float) -> None:
        self._reader = reader
        self._lookup = lookup
        self._timeout = timeout
        if lookup is not None:
            # several requests share one lookup; its error is each waiter's to log, and
            # must not be reported as never retrieved when no request waited for it
            lookup.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def reached(self) -> None:
        """See :class:`core.scheduling.ReadMark`. Without a lookup (the barrier off), at
        once."""
        if self._lookup is None:
            return
        clock = asyncio.get_running_loop().time
        began = clock()
        try:
            async with asyncio.timeout(self._timeout):
                ends = await asyncio.shield(self._lookup)  # shared: one waiter's timeout
                await self._reader._reach(ends)             # must not end the others'
        except TimeoutError:
            logger.warning("cancels on %s not read within %.1fs; going ahead without "
                           "them", self._reader._topic, clock() - began)
        except Exception as exc:  # noqa: BLE001 - a broker error or a stopped consumer:
            # the request goes ahead (the bound is what the barrier promises, not a cancel)
            logger.warning("cancels on %s not looked up (%s: %s); going ahead without them",
                           self._reader._topic, type(exc).__name__, exc)
