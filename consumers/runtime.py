"""The consume loop: records in, result events out, offsets committed after the results.

Delivery semantics (DESIGN.md):
- a record's offset is committed only after its completed/failed event was acknowledged;
- undecodable and invalid records become ``generation.failed`` at once (no poison pill);
- transient errors are retried with capped, jittered backoff, then reported retryable;
- same key in order, different keys concurrently, even within one partition;
- at most ``max_in_flight`` records are worked on: beyond that the partitions are paused;
- work runs in tasks (and threads below them), so fetching and heartbeats never starve;
- on revoke: work of the revoked partitions gets a short grace, what is done is committed,
  the rest is dropped (the next owner redoes it); nothing is committed for a partition no
  longer owned;
- on stop: no more fetching, in-flight work finishes within the grace period, results are
  published and committed, then the caller leaves the group.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from consumers.keyed import KeyedSerializer
from consumers.publisher import EventPublisher
from consumers.retry import RetryExhausted, RetryPolicy, call_with_retries
from consumers.routes import HandlerContext, Route
from consumers.tracking import PartitionTracker
from core.health import EngineHealth
from core.metrics import EngineMetrics
from schemas.codec import EventCodec
from schemas.errors import EngineError, InternalError, InvalidRequestError, UndecodableError
from schemas.events import GenerationCompleted, GenerationFailed, GenerationProgress

__all__ = ["ConsumeLoop", "DeliveryConfig", "ResultTopics"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeliveryConfig:
    max_in_flight: int = 64
    shutdown_grace: float = 30.0
    rebalance_grace: float = 5.0
    fetch_timeout_ms: int = 200

    def __post_init__(self) -> None:
        if self.max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {self.max_in_flight}")


@dataclass(frozen=True)
class ResultTopics:
    completed: str
    failed: str
    progress: str


@dataclass
class _Work:
    tp: TopicPartition
    record: ConsumerRecord[bytes, bytes]
    route: Route
    task: asyncio.Task[None] | None = None


class ConsumeLoop(ConsumerRebalanceListener):  # type: ignore[misc]
    """Owns records, offsets, commits, retries and shutdown for a set of routes."""

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        publisher: EventPublisher,
        codec: EventCodec,
        routes: Sequence[Route],
        results: ResultTopics,
        *,
        config: DeliveryConfig,
        retry: RetryPolicy,
        metrics: EngineMetrics,
        health: EngineHealth,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if not routes:
            raise ValueError("routes must name at least one input topic")
        self._consumer = consumer
        self._publisher = publisher
        self._codec = codec
        self._routes = {route.topic: route for route in routes}
        self._results = results
        self._config = config
        self._retry = retry
        self._metrics = metrics
        self._health = health
        self._sleep = sleep
        self._trackers: dict[TopicPartition, PartitionTracker] = {}
        self._work: dict[TopicPartition, dict[int, _Work]] = {}
        self._keyed = KeyedSerializer()
        self._stopping = asyncio.Event()
        self._commit_wanted = asyncio.Event()
        self._commit_lock = asyncio.Lock()
        self._paused = False

    # ----------------------------------------------------------------- public
    def request_stop(self) -> None:
        """Asks :meth:`run` to stop fetching and drain (safe from a signal handler)."""
        self._stopping.set()

    @property
    def in_flight(self) -> int:
        return sum(len(works) for works in self._work.values())

    async def run(self) -> None:
        """Consumes until :meth:`request_stop`, then drains, publishes and commits.

        The consumer must be started by the caller, who also stops it afterwards (which
        leaves the group).
        """
        self._consumer.subscribe(list(self._routes), listener=self)
        committer = asyncio.create_task(self._commit_when_wanted(), name="committer")
        stop_wait = asyncio.create_task(self._stopping.wait())
        try:
            while not self._stopping.is_set():
                fetch = asyncio.create_task(
                    self._consumer.getmany(
                        timeout_ms=self._config.fetch_timeout_ms,
                        max_records=max(1, self._config.max_in_flight - self.in_flight),
                    )
                )
                await asyncio.wait({fetch, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                if not fetch.done():
                    fetch.cancel()
                    await asyncio.gather(fetch, return_exceptions=True)
                    break
                for tp, records in fetch.result().items():
                    for record in records:
                        self._dispatch(tp, record)
                self._apply_backpressure()
                self._update_lag()
        finally:
            stop_wait.cancel()
            await self._drain(self._config.shutdown_grace)
            committer.cancel()
            await asyncio.gather(committer, stop_wait, return_exceptions=True)
            try:  # bounded: with the broker gone, aiokafka would retry the commit forever
                await asyncio.wait_for(self._commit(list(self._trackers)),
                                       timeout=max(1.0, self._config.shutdown_grace))
            except TimeoutError:
                logger.warning("final commit timed out: uncommitted records will be "
                               "redelivered (at-least-once)")

    # --------------------------------------------------------- rebalancing
    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        revoked = [tp for tp in revoked if tp in self._trackers]
        if not revoked:
            return
        tasks = [w.task for tp in revoked for w in self._work.get(tp, {}).values() if w.task]
        if tasks:
            await asyncio.wait(tasks, timeout=self._config.rebalance_grace)
        await self._commit(revoked)
        for tp in revoked:
            for work in self._work.pop(tp, {}).values():
                if work.task is not None and not work.task.done():
                    work.task.cancel()
            self._trackers.pop(tp, None)
        self._refresh_assignment()
        logger.info("partitions revoked: %s", _names(revoked))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        for tp in assigned:
            self._trackers.setdefault(tp, PartitionTracker())
            self._work.setdefault(tp, {})
        self._paused = False
        self._apply_backpressure()
        self._refresh_assignment()
        self._health.kafka_connected = True
        logger.info("partitions assigned: %s", _names(assigned))

    # -------------------------------------------------------------- records
    def _dispatch(self, tp: TopicPartition, record: ConsumerRecord[bytes, bytes]) -> None:
        tracker = self._trackers.get(tp)
        route = self._routes.get(tp.topic)
        if tracker is None or route is None:
            return  # no longer ours; the next owner reads it again
        tracker.fetched(record.offset)
        work = _Work(tp, record, route)
        self._work[tp][record.offset] = work
        self._metrics.consumed.labels(route.kind).inc()
        self._metrics.in_flight.labels(route.kind).inc()
        key = (tp, record.key)
        work.task = self._keyed.submit(key, lambda: self._process(work, tracker))
        work.task.add_done_callback(lambda _: self._metrics.in_flight.labels(route.kind).dec())

    async def _process(self, work: _Work, tracker: PartitionTracker) -> None:
        started = time.perf_counter()
        record, route = work.record, work.route
        where = f"topic={record.topic} partition={record.partition} offset={record.offset}"
        try:
            topic, event, request_id = await self._answer(work)
            try:
                await self._publisher.publish(topic, event, record.key, request_id)
            except Exception as exc:  # unencodable or refused by the broker: report that
                logger.exception("%s request_id=%s result not publishable", where, request_id)
                topic = self._results.failed
                event = self._failed(
                    work, InternalError(f"result not publishable: {str(exc)[:500]}"), 1,
                    {"request_id": request_id,
                     "conversation_id": getattr(event, "conversation_id", None)})
                await self._publisher.publish(topic, event, record.key, request_id)
        except Exception:
            # Not even a failed event could be published: leave the record uncommitted and
            # stop, so it is redelivered (to this instance restarted, or another one)
            # instead of pinning its partition silently.
            logger.critical("%s cannot be answered; stopping this consumer", where,
                            exc_info=True)
            self.request_stop()
            return
        if isinstance(event, GenerationFailed):
            self._metrics.failed.labels(route.kind, event.error_code).inc()
        else:
            self._metrics.completed.labels(route.kind).inc()
        self._metrics.processing.labels(route.kind).observe(time.perf_counter() - started)
        tracker.finished(record.offset)
        self._work.get(work.tp, {}).pop(record.offset, None)
        self._commit_wanted.set()
        self._apply_backpressure()

    async def _answer(self, work: _Work) -> tuple[str, Any, str | None]:
        """Decodes, validates and handles one record; always returns an event to publish."""
        record, route = work.record, work.route
        where = f"topic={record.topic} partition={record.partition} offset={record.offset}"
        raw: dict[str, Any] = {}
        try:
            schema_name, raw = self._codec.decode_raw(record.value, _content_type(record))
            event = self._codec.validate(route.model, raw, schema_name)
        except (UndecodableError, InvalidRequestError) as exc:
            request_id = _str_or_none(raw.get("request_id"))
            logger.warning("%s request_id=%s rejected: %s %s", where, request_id, exc.code, exc)
            return self._results.failed, self._failed(work, exc, 1, raw), request_id

        request_id = event.request_id  # type: ignore[attr-defined]
        where = f"{where} request_id={request_id}"
        logger.debug("%s %s request received", where, route.kind)

        async def report(step: int, total: int, loss: float | None) -> None:
            progress = GenerationProgress(
                request_id=request_id,
                conversation_id=_conversation(event, raw),
                kind=route.kind,
                step=step,
                total=total,
                loss=loss,
            )
            await self._publisher.publish(
                self._results.progress, progress, record.key, request_id
            )

        attempts = 0

        async def attempt() -> GenerationCompleted:
            nonlocal attempts
            attempts += 1
            return await route.handler(event, HandlerContext(attempt=attempts, progress=report))

        def on_retry(error: EngineError, attempt_no: int, wait: float) -> None:
            self._metrics.retries.labels(route.kind, error.code).inc()
            logger.info(
                "%s attempt %d failed with %s (%s); retrying in %.2fs",
                where, attempt_no, error.code, error, wait,
            )

        try:
            completed, _ = await call_with_retries(
                attempt, self._retry, sleep=self._sleep, on_retry=on_retry
            )
        except RetryExhausted as exc:
            log = logger.error if exc.error.code == "INTERNAL" else logger.warning
            log("%s failed after %d attempt(s): %s %s", where, exc.attempts, exc.error.code,
                exc.error, exc_info=exc.error.code == "INTERNAL")
            return self._results.failed, self._failed(work, exc.error, exc.attempts, raw), request_id
        logger.info("%s %s completed", where, route.kind)
        return self._results.completed, completed, request_id

    def _failed(
        self, work: _Work, error: EngineError, attempts: int, raw: dict[str, Any]
    ) -> GenerationFailed:
        record = work.record
        conversation = _str_or_none(raw.get("conversation_id"))
        if conversation is None and record.key is not None:
            conversation = record.key.decode("utf-8", "replace")
        return GenerationFailed(
            request_id=_str_or_none(raw.get("request_id")),
            conversation_id=conversation,
            kind=work.route.kind,
            error_code=str(error.code),
            message=error.message,
            retryable=error.retryable,
            attempts=attempts,
            source_topic=record.topic,
            source_partition=record.partition,
            source_offset=record.offset,
        )

    # --------------------------------------------------------------- commits
    async def _commit_when_wanted(self) -> None:
        failures = 0
        while True:
            await self._commit_wanted.wait()
            self._commit_wanted.clear()
            if await self._commit(list(self._trackers)):
                failures = 0
            else:  # the broker is struggling: back off before the next try
                failures += 1
                await self._sleep(min(5.0, 0.1 * 2**failures))

    async def _commit(self, partitions: list[TopicPartition]) -> bool:
        """Commits what is answered in ``partitions``; False when the broker failed (the
        commit is wanted again)."""
        async with self._commit_lock:
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
                logger.warning("commit of %s skipped: %s", _names(list(offsets)), exc)
                return True
            except KafkaError as exc:
                logger.warning("commit of %s failed, will retry: %s", _names(list(offsets)), exc)
                self._commit_wanted.set()
                return False
            for tp, position in offsets.items():
                tracker = self._trackers.get(tp)
                if tracker is not None:
                    tracker.mark_committed(position)
            return True

    # ------------------------------------------------------- flow control
    def _apply_backpressure(self) -> None:
        assignment = [tp for tp in self._consumer.assignment() if tp in self._trackers]
        if not assignment:
            return
        in_flight = self.in_flight
        if not self._paused and in_flight >= self._config.max_in_flight:
            self._consumer.pause(*assignment)
            self._paused = True
            logger.debug("paused fetching: %d in flight", in_flight)
        elif self._paused and in_flight <= self._config.max_in_flight // 2:
            self._consumer.resume(*assignment)
            self._paused = False
            logger.debug("resumed fetching: %d in flight", in_flight)

    async def _drain(self, grace: float) -> None:
        tasks = [w.task for works in self._work.values() for w in works.values() if w.task]
        if not tasks:
            return
        logger.info("stopping: finishing %d in-flight request(s) within %.1fs", len(tasks), grace)
        _, pending = await asyncio.wait(tasks, timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            logger.warning("stopping: %d request(s) not finished, left uncommitted", len(pending))
            await asyncio.gather(*pending, return_exceptions=True)

    def _update_lag(self) -> None:
        for tp, tracker in self._trackers.items():
            highwater = self._consumer.highwater(tp)
            position = tracker.position()
            if highwater is not None and position is not None:
                self._metrics.lag.labels(tp.topic, str(tp.partition)).set(highwater - position)

    def _refresh_assignment(self) -> None:
        self._health.assigned = [(tp.topic, tp.partition) for tp in self._trackers]


def _content_type(record: ConsumerRecord[bytes, bytes]) -> str | None:
    for name, value in record.headers or ():
        if name.lower() == "content-type" and value is not None:
            return str(value.decode("latin-1"))
    return None


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _conversation(event: Any, raw: dict[str, Any]) -> str | None:
    return getattr(event, "conversation_id", None) or _str_or_none(raw.get("conversation_id"))


def _names(partitions: list[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(partitions)) or "none"
