"""The consume loop: records in, result events out, offsets committed after the results.

Delivery semantics (DESIGN.md), and where each lives:
- fetching, dispatching and publishing: here; one task per fetched record;
- decoding, scheduling, handling and retries: :mod:`consumers.answering`;
- per-conversation order (same key in fetch order, other keys concurrently):
  :mod:`consumers.keyed`;
- memory bound per kind (a full kind pauses only those of its partitions holding their
  share of it): :mod:`consumers.flow`;
- commits after the answers were acknowledged: :mod:`consumers.committer`;
- consumer lag, kept true while a partition is paused: :mod:`consumers.lag`;
- rebalances (short grace, commit what is done, drop the rest): :mod:`consumers.rebalance`;
- a cancellation only a stop or a revoke leaves unanswered: one raised by a record's work
  while neither happened (work that stopped on its own) answers the record again, then
  fails it, never dropping it with its partition's commits stuck behind it;
- the read barrier on cancels (:mod:`core.scheduling.barrier`): one mark per fetch, which
  every record of it waits for before its work starts;
- a record's log fields and trace (its ``traceparent`` continued onto what it causes): set
  here around its work (:mod:`core.telemetry`);
- on stop: no more fetching, in-flight work finishes within the grace period, results are
  published and committed, then the caller leaves the group.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from consumers.answering import Answer, RecordAnswerer, ResultTopics
from consumers.committer import Committer
from consumers.failures import failed_event
from consumers.flow import FlowControl, FlowLimits
from consumers.keyed import KeyedTurns, Turn
from consumers.lag import REFRESH_INTERVAL, ConsumerLag
from consumers.publisher import EventPublisher
from consumers.rebalance import RebalanceHandler
from consumers.records import trace_context
from consumers.retry import RetryPolicy
from consumers.routes import Route
from core.health import EngineHealth
from core.metrics import EngineMetrics
from core.scheduling import ReadBarrier, ReadMark, Scheduling
from core.telemetry import ContextSpans, Spans, current_trace, log_context
from schemas.codec import EventCodec
from schemas.errors import InternalError
from schemas.events import Event, GenerationFailed

__all__ = ["ConsumeLoop", "DeliveryConfig", "RecordNotAnswerableError", "ResultTopics"]

logger = logging.getLogger(__name__)

_FINAL_COMMIT_TIMEOUT = 5.0
_CANCEL_TIMEOUT = 5.0  # for cancelled work to unwind (it never waits on the broker)


class _WorkInterruptedError(InternalError):
    """A record's work kept stopping with a cancellation nobody asked for: an engine fault,
    and the same request may well succeed later."""

    retryable = True


class RecordNotAnswerableError(RuntimeError):
    """The loop stopped because a record could not be answered, not even by a failed event:
    it stays uncommitted, for the instance restarted (or another one) to take again."""


@dataclass(frozen=True)
class DeliveryConfig:
    flow: FlowLimits = field(default_factory=FlowLimits)
    shutdown_grace: float = 30.0
    rebalance_grace: float = 5.0
    fetch_timeout_ms: int = 200
    lag_refresh_interval: float = REFRESH_INTERVAL  # end offsets asked for (paused too)


@dataclass
class _Work:
    tp: TopicPartition
    record: ConsumerRecord[bytes, bytes]
    route: Route
    size: int
    mark: ReadMark | None  # the cancels read before its work starts
    task: asyncio.Task[None] | None = None
    unanswerable: bool = False  # not even a failed event could be published


class ConsumeLoop:
    """Owns records, offsets, commits and shutdown for a set of routes."""

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
        scheduling: Scheduling,
        spans: Spans | None = None,
        read_barrier: ReadBarrier | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if not routes:
            raise ValueError("routes must name at least one input topic")
        self._consumer = consumer
        self._publisher = publisher
        self._routes = {route.topic: route for route in routes}
        self._results = results
        self._config = config
        self._metrics = metrics
        self._health = health
        self._read_barrier = read_barrier
        self._spans = spans or ContextSpans()
        self._retry = retry
        self._sleep = sleep
        self._answerer = RecordAnswerer(codec, publisher, results, scheduling, retry=retry,
                                        metrics=metrics, spans=self._spans, sleep=sleep)
        self._committer = Committer(consumer, sleep=sleep)
        self._lag = ConsumerLag(consumer, self._committer, metrics.lag,
                                interval=config.lag_refresh_interval)
        self._flow = FlowControl(consumer, {r.topic: r.kind for r in routes}, config.flow,
                                 health)
        self._listener = RebalanceHandler(self._committer, self, health,
                                          grace=config.rebalance_grace,
                                          on_assigned=self._restate_flow)
        self._work: dict[TopicPartition, dict[int, _Work]] = {}
        self._turns = KeyedTurns()
        self._stopping = asyncio.Event()
        self._unanswerable: str | None = None  # where the record that stopped us was
        self._fetch: asyncio.Task[dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]] \
            | None = None  # the last fetch, until its records are dispatched

    # ----------------------------------------------------------------- public
    def request_stop(self) -> None:
        """Asks :meth:`run` to stop fetching and drain (safe from a signal handler)."""
        self._stopping.set()

    @property
    def in_flight(self) -> int:
        """Records fetched and not answered yet (at work or waiting for their turn)."""
        return sum(len(works) for works in self._work.values())

    async def run(self) -> None:
        """Consumes until :meth:`request_stop`, then drains, publishes and commits.

        The consumer must be started by the caller, who also stops it afterwards (which
        leaves the group).
        """
        self._consumer.subscribe(list(self._routes), listener=self._listener)
        committer = asyncio.create_task(self._committer.run(), name="committer")
        lag = asyncio.create_task(self._lag.run(), name="lag refresher")
        stop_wait = asyncio.create_task(self._stopping.wait())
        try:
            while not self._stopping.is_set():
                fetch = self._fetch = asyncio.create_task(self._consumer.getmany(
                    timeout_ms=self._config.fetch_timeout_ms, max_records=self._flow.room()))
                await asyncio.wait({fetch, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                if not fetch.done():
                    fetch.cancel()
                    await asyncio.gather(fetch, return_exceptions=True)
                    break
                self._dispatch_fetched(fetch)
                self._apply_flow()
                self._lag.update()
        finally:
            stop_wait.cancel()
            lag.cancel()
            await self._drain(self._config.shutdown_grace)
            committer.cancel()
            await asyncio.gather(committer, stop_wait, lag, return_exceptions=True)
            try:  # bounded: with the broker gone, aiokafka would retry the commit forever
                await asyncio.wait_for(self._committer.commit(self._committer.owned),
                                       timeout=_FINAL_COMMIT_TIMEOUT)
            except TimeoutError:
                logger.warning("final commit timed out: uncommitted records will be "
                               "redelivered (at-least-once)")
        if self._unanswerable is not None:  # a crash, not a stop: the process exits non-zero
            raise RecordNotAnswerableError(f"{self._unanswerable}: not even a failed event "
                                           "could be published")

    # ------------------------------------------- the work of partitions (rebalance)
    async def settle(self, partitions: Iterable[TopicPartition], grace: float) -> int:
        """Lets the work of ``partitions`` finish within ``grace`` seconds, then cancels
        what is left (uncommitted: redelivered). Records waiting for their turn or a slot
        get the grace too: a record cancelled while later ones of its partition are
        answered would hold the commit back, and those answered ones would be redone.
        Returns how many were left unfinished (cancelled)."""
        fetch = self._fetch
        if fetch is not None and fetch.done() and not fetch.cancelled() \
                and fetch.exception() is None:
            # records fetched before this revoke but not dispatched yet belong to it: they
            # must be dispatched (then cancelled) before the partitions are let go, or
            # they would be dispatched after the next assignment, ahead of the records
            # it fetches again from the committed offsets: out of order
            self._dispatch_fetched(fetch)
        tasks = [w.task for tp in partitions for w in self._work.get(tp, {}).values()
                 if w.task is not None and not w.task.done()]
        stopped: set[asyncio.Task[None]] = set()
        if tasks:
            _, stopped = await asyncio.wait(tasks, timeout=grace)
        for task in stopped:
            task.cancel()
        if stopped:
            _, stuck = await asyncio.wait(stopped, timeout=_CANCEL_TIMEOUT)
            if stuck:
                logger.warning("%d cancelled request(s) did not unwind in %.0fs", len(stuck),
                               _CANCEL_TIMEOUT)
        return len(stopped)

    def drop(self, partitions: Iterable[TopicPartition]) -> None:
        partitions = list(partitions)
        for tp in partitions:
            for work in self._work.pop(tp, {}).values():
                if work.task is not None and not work.task.done():
                    work.task.cancel()  # its own cleanup gives back what it held
        # another member owns their lag now: summed over instances, count it once
        self._lag.forget(partitions)

    # -------------------------------------------------------------- records
    def _dispatch_fetched(self, fetch: asyncio.Task[
            dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]]) -> None:
        """Dispatches a finished fetch's records, once."""
        if fetch is not self._fetch:
            return  # dispatched already
        self._fetch = None
        fetched = fetch.result()
        if not any(fetched.values()):
            return
        # everything fetched is now in the log: so is every cancel published before it
        mark = self._read_barrier() if self._read_barrier is not None else None
        for tp, records in fetched.items():
            for record in records:
                self._dispatch(tp, record, mark)

    def _dispatch(self, tp: TopicPartition, record: ConsumerRecord[bytes, bytes],
                  mark: ReadMark | None) -> None:
        tracker = self._committer.tracker(tp)
        route = self._routes.get(tp.topic)
        if tracker is None or route is None:
            return  # no longer ours; the next owner reads it again
        tracker.fetched(record.offset)
        work = _Work(tp, record, route, len(record.value or b"") + len(record.key or b""),
                     mark)
        self._work.setdefault(tp, {})[record.offset] = work
        self._flow.took(tp, work.size)
        self._metrics.consumed.labels(route.kind).inc()
        self._metrics.in_flight.labels(route.kind).inc()
        turn = self._turns.join((tp, record.key))  # in fetch order: the key's order
        work.task = asyncio.get_running_loop().create_task(self._process(work, turn))
        work.task.add_done_callback(lambda _: self._let_go(work, turn))

    async def _process(self, work: _Work, turn: Turn) -> None:
        record = work.record
        # every line logged for this record, in this task and those it starts, says where
        # it came from; its trace (if the producer sent one) goes on everything it causes
        with log_context(topic=record.topic, partition=record.partition,
                         offset=record.offset, kind=work.route.kind), \
                self._spans.span(f"{record.topic} process", trace_context(record.headers),
                                 "consumer", {"messaging.system": "kafka",
                                              "messaging.destination.name": record.topic,
                                              "messaging.kafka.partition": record.partition,
                                              "messaging.kafka.offset": record.offset}):
            await self._answer_and_publish(work, turn)

    async def _answer_and_publish(self, work: _Work, turn: Turn) -> None:
        started = time.perf_counter()
        record, route = work.record, work.route
        where = f"topic={record.topic} partition={record.partition} offset={record.offset}"
        try:
            answer = await self._answer(work, turn, where)
            topic, event = answer.topic, answer.event
            try:
                await self._publish(topic, event, record, answer.request_id)
            except Exception as exc:  # unencodable or refused by the broker: report that
                logger.exception("%s request_id=%s result not publishable", where,
                                 answer.request_id)
                topic = self._results.failed
                event = failed_event(
                    record, route.kind,
                    InternalError(f"result not publishable: {type(exc).__name__}"), 1,
                    {"request_id": answer.request_id,
                     "conversation_id": getattr(event, "conversation_id", None)})
                await self._publish(topic, event, record, answer.request_id)
        except Exception:
            # Not even a failed event could be published: leave the record uncommitted and
            # stop, so it is redelivered (to this instance restarted, or another one)
            # instead of pinning its partition silently. Its turn is kept: nothing of its
            # conversation may be answered before it (the stop cancels those waiting).
            logger.critical("%s cannot be answered; stopping this consumer", where,
                            exc_info=True)
            work.unanswerable = True
            self._unanswerable = self._unanswerable or where
            self.request_stop()
            return
        turn.leave()  # after publishing: the next of this conversation answers after
        if isinstance(event, GenerationFailed):
            self._metrics.failed.labels(route.kind, event.error_code).inc()
        else:
            self._metrics.completed.labels(route.kind).inc()
        self._metrics.request_duration.labels(route.kind).observe(time.perf_counter() - started)
        tracker = self._committer.tracker(work.tp)
        if tracker is not None and self._work.get(work.tp, {}).get(record.offset) is work:
            tracker.finished(record.offset)
            self._committer.want()

    async def _answer(self, work: _Work, turn: Turn, where: str) -> Answer:
        """The answerer's answer to ``work``. A cancellation its work raises while nobody
        cancelled this task and the loop is not stopping is no stop nor revoke: dropped
        then, the record would never be answered, and its partition's commits would stay
        behind it for good. So it is answered again (its turn kept, after a backoff), up to
        RETRY_MAX_ATTEMPTS runs, then failed ``INTERNAL`` (retryable)."""
        task = asyncio.current_task()
        runs = self._retry.max_attempts
        for run in range(1, runs + 1):
            try:
                return await self._answerer.answer(work.record, work.route, turn, work.mark)
            except asyncio.CancelledError:
                if self._stopping.is_set() or task is None or task.cancelling():
                    raise  # a stop or a revoke: left uncommitted, redelivered
                logger.error("%s work stopped with a cancellation nobody asked for (run %d "
                             "of %d)", where, run, runs)
            if run < runs:
                await self._sleep(self._retry.jittered(run))
        error = _WorkInterruptedError(f"work stopped {runs} times without being cancelled")
        return self._answerer.failed(work.record, work.route, error, runs)

    async def _publish(self, topic: str, event: Event,
                       record: ConsumerRecord[bytes, bytes], request_id: str | None) -> None:
        with self._spans.span(f"{topic} publish", current_trace.get(), "producer",
                              {"messaging.system": "kafka",
                               "messaging.destination.name": topic}) as trace:
            await self._publisher.publish(topic, event, record.key, request_id, trace=trace)

    def _let_go(self, work: _Work, turn: Turn) -> None:
        """The record's task ended (answered, dropped, cancelled, even before its first
        step): free what it held."""
        if not work.unanswerable:
            turn.leave()  # idempotent
        works = self._work.get(work.tp)
        if works is not None and works.get(work.record.offset) is work:
            del works[work.record.offset]
        self._flow.let_go(work.tp, work.size)
        self._metrics.in_flight.labels(work.route.kind).dec()
        self._apply_flow()

    # ------------------------------------------------------- flow control
    def _apply_flow(self) -> None:
        self._flow.apply(self._committer.owned)

    def _restate_flow(self) -> None:  # after an assignment
        self._flow.apply(self._committer.owned, restate=True)

    async def _drain(self, grace: float) -> None:
        if not self.in_flight:
            return
        logger.info("stopping: finishing %d request(s) within %.1fs", self.in_flight, grace)
        left = await self.settle(list(self._work), grace)
        if left:
            logger.warning("stopping: %d request(s) not finished, left uncommitted", left)
