"""One record → the event that answers it: decode, schedule, handle, retry.

- Undecodable and invalid records are answered ``UNDECODABLE`` / ``INVALID_REQUEST`` at once.
- A valid request is registered as pending (cancels and deadlines act on it), waits until
  the cancels published before it were read (its fetch's :class:`~core.scheduling.ReadMark`),
  for its conversation's turn and a slot of its kind (:class:`~core.scheduling.Admission`), then
  its handler runs; transient errors are retried with capped, jittered backoff, within
  the request's one :class:`~core.retry_budget.RetryBudget` (shared with the handler's own
  upstream retries; the failed event's ``attempts`` is its count).
- An interactive request promotes the requests ahead of it in its conversation's line to
  interactive (priority inheritance): it waits for them, so they must not wait as background.
- A cancel answers it ``CANCELLED`` wherever it is; a deadline passed before its work
  started answers it ``EXPIRED`` (:func:`~core.scheduling.supervise`) -- unless its answer
  is remembered (a redelivery of a request completed before, on this instance or one that
  died before committing it): then it is answered with that same completed event, the
  lookup costing no GPU, upstream or LLM call (:attr:`~consumers.routes.Route.remembered`).
- Dropped by a revoke or a stop while its work runs, the request may keep that work for
  its next delivery (:meth:`~core.scheduling.PendingRequest.keeps`): it stays pending
  until the work ends, so that a cancel still stops it.

Handlers see events, never records; a handler's :class:`asyncio.CancelledError` (the
engine stopping) passes through, so the record stays unanswered and uncommitted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from aiokafka import ConsumerRecord

from consumers.failures import failed_event
from consumers.keyed import Turn
from consumers.publisher import EventPublisher
from consumers.records import content_type, text_or_none
from consumers.replay import copy_published_at
from consumers.retry import RetryExhausted, RetryPolicy, call_with_retries
from consumers.routes import HandlerContext, Route
from core.metrics import EngineMetrics
from core.retry_budget import RetryBudget
from core.scheduling import (
    Priority,
    ReadMark,
    Scheduling,
    cancels_read,
    deadline_of,
    effective_priority,
    supervise,
)
from core.telemetry import ContextSpans, Spans, current_trace, log_context
from schemas.codec import EventCodec
from schemas.errors import (
    EngineError,
    InvalidRequestError,
    RequestCancelledError,
    RequestExpiredError,
    UndecodableError,
)
from schemas.events import Event, GenerationCompleted, GenerationProgress, parse_instant
from schemas.registry import SchemaRegistryError

__all__ = ["Answer", "RecordAnswerer", "ResultTopics"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResultTopics:
    completed: str
    failed: str
    progress: str


@dataclass(frozen=True)
class Answer:
    """What to publish for a record: the topic, the event and its request id."""

    topic: str
    event: Event
    request_id: str | None


class RecordAnswerer:
    def __init__(self, codec: EventCodec, publisher: EventPublisher, results: ResultTopics,
                 scheduling: Scheduling, *, retry: RetryPolicy, metrics: EngineMetrics,
                 sleep: Callable[[float], Awaitable[None]], spans: Spans | None = None) -> None:
        self._codec = codec
        self._publisher = publisher
        self._results = results
        self._scheduling = scheduling
        self._retry = retry
        self._metrics = metrics
        self._sleep = sleep
        self._spans = spans or ContextSpans()

    async def answer(self, record: ConsumerRecord[bytes, bytes], route: Route,
                     turn: Turn, mark: ReadMark | None = None) -> Answer:
        """Always an answer; raises only ``CancelledError`` (the engine stopping). With
        ``mark``, no work starts (nor a result cache answers) before it is reached."""
        where = f"topic={record.topic} partition={record.partition} offset={record.offset}"
        raw: dict[str, Any] = {}
        try:
            await self._writer_schema(record.value, where)
            schema_name, raw = self._codec.decode_raw(record.value, content_type(record.headers))
            event = self._codec.validate(route.model, raw, schema_name)
        except (UndecodableError, InvalidRequestError) as exc:
            with log_context(request_id=text_or_none(raw.get("request_id")),
                             conversation_id=text_or_none(raw.get("conversation_id"))):
                logger.warning("%s request_id=%s rejected: %s %s", where,
                               text_or_none(raw.get("request_id")), exc.code, exc,
                               extra={"error_code": str(exc.code)})
            return self._failed(record, route, exc, 1, raw)

        request_id: str = event.request_id  # type: ignore[attr-defined]
        with log_context(request_id=request_id,
                         conversation_id=getattr(event, "conversation_id", None)):
            return await self._answer_valid(record, route, turn, mark, event, raw,
                                            f"{where} request_id={request_id}")

    async def _writer_schema(self, value: bytes | None, where: str) -> None:
        """Fetches a Confluent-framed record's writer schema from the Schema Registry,
        waiting (capped backoff, for as long as it takes) while the registry is out of
        reach: a registry outage delays records, it never fails them. Raises
        :class:`UndecodableError` when the registry answers but not with a usable schema."""
        async def pause(outage: int, exc: Exception) -> None:
            wait = self._retry.jittered(min(outage, 30)) or 0.01
            logger.warning("%s waiting for the Schema Registry (try %d): %s; retrying "
                           "in %.2fs", where, outage, exc, wait)
            await self._sleep(wait)

        try:
            await self._codec.resolve_writer_waiting(value, pause)
        except SchemaRegistryError as exc:
            raise UndecodableError(f"writer schema not found: {exc}") from exc

    async def _answer_valid(self, record: ConsumerRecord[bytes, bytes], route: Route,
                            turn: Turn, mark: ReadMark | None, event: Any,
                            raw: dict[str, Any], where: str) -> Answer:
        request_id: str = event.request_id
        logger.debug("%s %s request received", where, route.kind)
        try:
            pending = self._register(record, route, event, raw)
        except InvalidRequestError as exc:  # a deadline that is no instant
            logger.warning("%s rejected: %s %s", where, exc.code, exc,
                           extra={"error_code": str(exc.code)})
            return self._failed(record, route, exc, 1, raw)
        turn.on_urged(pending.promote)
        if pending.priority is Priority.INTERACTIVE:
            turn.urge_ahead()  # those ahead run at its priority: it waits for them
        runs = 0
        retries = self._metrics.retries
        # every retry of this request draws on it, the consume loop's and the upstream
        # calls' alike, and each one it grants is counted once
        budget = RetryBudget(self._retry, on_retry=lambda error: retries.labels(
            route.kind, error.code).inc())
        request_trace = current_trace.get()  # the consume span's; progress hangs off it

        # a record dropped by a revoke or a stop comes again: its running work goes on for
        # that delivery (into the result cache), unless the request was cancelled; the
        # request stays pending meanwhile, so that a cancel still stops that work
        placement = replace(pending.placement(), keep_when_abandoned=pending)

        async def progress(step: int, total: int, loss: float | None, *,
                           stream_url: str | None = None) -> None:
            topic = self._results.progress
            with self._spans.span(f"{topic} publish", request_trace, "producer") as trace:
                await self._publisher.publish(topic, GenerationProgress(
                    request_id=request_id,
                    conversation_id=getattr(event, "conversation_id", None),
                    kind=route.kind, step=step, total=total, loss=loss, stream_url=stream_url,
                ), record.key, request_id, trace=trace)

        async def attempt() -> GenerationCompleted:
            nonlocal runs
            runs += 1
            with self._spans.span(f"{route.kind} work", current_trace.get(), "internal",
                                  {"engine.request_id": request_id, "engine.attempt": runs}):
                return await route.handler(event, HandlerContext(
                    attempt=runs, progress=progress, placement=placement, budget=budget))

        def on_retry(error: EngineError, run: int, wait: float) -> None:
            logger.info("%s run %d failed with %s (%s) after %d attempt(s); retrying in %.2fs",
                        where, run, error.code, error, budget.attempts, wait)

        async def scheduled() -> GenerationCompleted:
            await cancels_read(mark, pending)
            await turn.wait()
            async with self._scheduling.admission.slot(route.kind, pending.conversation_id,
                                                       pending.priority, pending.promotion):
                if route.kind != "image":  # an image starts when the GPU takes it
                    pending.mark_started()
                completed, _ = await call_with_retries(
                    attempt, budget, sleep=self._sleep, on_retry=on_retry)
                return completed

        stopping = False
        stopped: RequestCancelledError | RequestExpiredError | None = None
        try:
            completed = await supervise(pending, scheduled())
        except (RequestCancelledError, RequestExpiredError) as exc:
            stopped = exc
        except RetryExhausted as exc:
            self._count_stopped(route, exc.error)
            log = logger.error if exc.error.code == "INTERNAL" else logger.warning
            log("%s failed after %d attempt(s): %s %s", where, exc.attempts, exc.error.code,
                exc.error, exc_info=exc.error.code == "INTERNAL",
                extra={"error_code": str(exc.error.code)})
            return self._failed(record, route, exc.error, exc.attempts, raw)
        except asyncio.CancelledError:
            stopping = True  # the engine stopping: its work time is no measurement
            raise
        finally:
            if not pending.kept:  # else its kept work forgets it when it ends
                self._scheduling.pending.remove(pending)
            if pending.started_at is not None and not stopping:  # work start → result
                self._metrics.processing.labels(route.kind).observe(
                    time.monotonic() - pending.started_at)
        if stopped is not None:
            return await self._stopped(record, route, event, stopped, budget.attempts, raw,
                                       where)
        logger.info("%s %s completed", where, route.kind)
        return Answer(self._results.completed, completed, request_id)

    async def _stopped(self, record: ConsumerRecord[bytes, bytes], route: Route, event: Any,
                       error: RequestCancelledError | RequestExpiredError, attempts: int,
                       raw: dict[str, Any], where: str) -> Answer:
        """A cancelled or expired request's answer: ``failed`` with ``error``, unless its
        answer is remembered (:attr:`Route.remembered`). A request that completed on an
        instance that died before committing it comes again, maybe past its deadline or
        cancelled since: its consumer may have seen it completed, so it is completed
        again, the same files at the same URLs, never failed after."""
        remembered: GenerationCompleted | None = None
        if route.remembered is not None:
            try:
                remembered = await route.remembered(event)
            except Exception:  # a lookup that fails leaves the answer it would have had
                logger.warning("%s remembered answer not looked up", where, exc_info=True)
        if remembered is not None:
            logger.info("%s %s, but its answer is remembered: %s completed again", where,
                        error.code, route.kind)
            return Answer(self._results.completed, remembered, event.request_id)
        self._count_stopped(route, error)
        logger.info("%s %s: %s", where, error.code, error, extra={"error_code": str(error.code)})
        return self._failed(record, route, error, attempts, raw)

    def _register(self, record: ConsumerRecord[bytes, bytes], route: Route, event: Any,
                  raw: dict[str, Any]) -> Any:
        published = record.timestamp / 1000 if record.timestamp and record.timestamp > 0 \
            else time.time()
        created = _instant(getattr(event, "created_at", None))
        deadline = deadline_of(getattr(event, "deadline", None))
        priority = effective_priority(
            getattr(event, "priority", None), published_at=published, created_at=created,
            replay_age=self._scheduling.replay_age)
        conversation = getattr(event, "conversation_id", None) or (
            record.key.decode("utf-8", "replace") if record.key else "")
        # a replayed copy keeps its original's timestamp (its priority above), but was
        # published when the replay sent it: a conversation's cancel before then spares it
        sent = copy_published_at(record.headers, now=time.time())
        return self._scheduling.pending.add(
            event.request_id, conversation, route.kind, priority, deadline=deadline,
            published_at=published if sent is None else sent)

    def _count_stopped(self, route: Route, error: EngineError) -> None:
        if isinstance(error, RequestCancelledError):
            self._metrics.cancelled.labels(route.kind).inc()
        elif isinstance(error, RequestExpiredError):
            self._metrics.expired.labels(route.kind).inc()

    def failed(self, record: ConsumerRecord[bytes, bytes], route: Route, error: EngineError,
               attempts: int) -> Answer:
        """``record`` answered with ``error`` after ``attempts`` runs, its identity read
        from it again (as far as it decodes)."""
        raw: dict[str, Any] = {}
        try:
            _, raw = self._codec.decode_raw(record.value, content_type(record.headers))
        except EngineError:
            pass
        return self._failed(record, route, error, attempts, raw)

    def _failed(self, record: ConsumerRecord[bytes, bytes], route: Route, error: EngineError,
                attempts: int, raw: dict[str, Any]) -> Answer:
        return Answer(self._results.failed,
                      failed_event(record, route.kind, error, attempts, raw),
                      text_or_none(raw.get("request_id")))


def _instant(value: str | None) -> float | None:
    """``created_at`` as epoch seconds; only a hint (replay age), so unusable means none."""
    if value is None:
        return None
    try:
        return parse_instant(value).timestamp()
    except (ValueError, OverflowError):
        return None
