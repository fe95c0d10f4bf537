"""Delivery semantics of the consume loop on the real broker, with handlers the test
controls (the loop is generic; these handlers stand in for slow or failing work)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from consumers.flow import FlowLimits
from consumers.routes import HandlerContext
from consumers.runtime import RecordNotAnswerableError
from core.scheduling import build_scheduling
from schemas.errors import UpstreamUnavailableError
from schemas.events import GenerationCompleted, VoiceRequested
from tests.support.kafka_client import PersonaPeer

pytestmark = pytest.mark.kafka


def completed(event: VoiceRequested) -> GenerationCompleted:
    return GenerationCompleted(request_id=event.request_id,
                               conversation_id=event.conversation_id, kind="voice",
                               text=event.text)


def request(conversation: str, text: str) -> dict[str, Any]:
    return {"request_id": str(uuid.uuid4()), "conversation_id": conversation, "text": text}


async def test_same_key_keeps_order_while_other_keys_overtake(harness: Any,
                                                              peer: PersonaPeer) -> None:
    gate = asyncio.Event()
    seen: list[str] = []

    async def handler(event: VoiceRequested, context: HandlerContext) -> GenerationCompleted:
        assert isinstance(event, VoiceRequested)  # handlers see events, not records
        seen.append(event.text)
        if event.text == "a1":
            await gate.wait()
        return completed(event)

    await harness.start([("voice", "voice", VoiceRequested, handler)])
    a1, a2, b1 = request("conv-a", "a1"), request("conv-a", "a2"), request("conv-b", "b1")
    for r in (a1, a2, b1):
        await peer.publish("voice", r)
    await peer.answers_for([b1["request_id"]])  # b overtakes the blocked a1 ...
    assert "a2" not in seen  # ... while a2 waits behind a1
    gate.set()
    answers = await peer.answers_for([a1["request_id"], a2["request_id"]])
    assert answers[a1["request_id"]].offset < answers[a2["request_id"]].offset


async def test_transient_errors_retry_then_fail_retryable(harness: Any, peer: PersonaPeer) -> None:
    calls: dict[str, int] = {}

    async def handler(event: VoiceRequested, context: HandlerContext) -> GenerationCompleted:
        calls[event.text] = calls.get(event.text, 0) + 1
        assert context.attempt == calls[event.text]
        if event.text == "always-down" or calls[event.text] < 2:
            raise UpstreamUnavailableError("upstream 503")
        return completed(event)

    await harness.start([("voice", "voice", VoiceRequested, handler)])
    flaky, down = request("c1", "flaky-once"), request("c2", "always-down")
    await peer.publish("voice", flaky)
    await peer.publish("voice", down)
    answers = await peer.answers_for([flaky["request_id"], down["request_id"]])
    assert answers[flaky["request_id"]].kind == "completed"
    failed = answers[down["request_id"]].event
    assert failed["error_code"] == "UPSTREAM_UNAVAILABLE"
    assert failed["retryable"] is True and failed["attempts"] == 3
    assert calls == {"flaky-once": 2, "always-down": 3}
    retries = harness.metrics.retries.labels("voice", "UPSTREAM_UNAVAILABLE")._value.get()
    assert retries == 1 + 2


async def test_work_taken_in_is_bounded_per_kind(harness: Any, peer: PersonaPeer) -> None:
    gate = asyncio.Event()
    running = 0
    peak = 0
    started = asyncio.Queue[str]()

    async def handler(event: VoiceRequested, context: HandlerContext) -> GenerationCompleted:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await started.put(event.text)
        await gate.wait()
        running -= 1
        return completed(event)

    settings = harness.settings.model_copy(update={"max_in_flight_voice": 2})
    await harness.start([("voice", "voice", VoiceRequested, handler)],
                        scheduling=build_scheduling(settings, harness.metrics))
    requests = [request(f"conv-{i}", f"r{i}") for i in range(6)]
    for r in requests:
        await peer.publish("voice", r)
    for _ in range(2):
        await asyncio.wait_for(started.get(), timeout=10)
    assert running == 2  # the others wait for a slot
    gate.set()
    answers = await peer.answers_for([r["request_id"] for r in requests])
    assert all(a.kind == "completed" for a in answers.values())
    assert peak <= 2


async def test_records_held_in_memory_are_bounded_by_pausing(harness: Any,
                                                             peer: PersonaPeer) -> None:
    gate = asyncio.Event()
    started = asyncio.Queue[str]()

    async def handler(event: VoiceRequested, context: HandlerContext) -> GenerationCompleted:
        await started.put(event.text)
        await gate.wait()
        return completed(event)

    loop = await harness.start([("voice", "voice", VoiceRequested, handler)],
                               flow=FlowLimits(max_records=3))
    requests = [request("conv-flood", f"r{i}") for i in range(8)]
    for r in requests:
        await peer.publish("voice", r)
    await asyncio.wait_for(started.get(), timeout=10)
    assert harness.consumer is not None
    await harness.health.wait_until(lambda h: h.paused_kinds == ["voice"], timeout=10)
    assert harness.consumer.paused()
    assert loop.in_flight <= 3 + 2  # the bound, and what one fetch may overshoot it by
    gate.set()
    answers = await peer.answers_for([r["request_id"] for r in requests])
    assert [answers[r["request_id"]].offset for r in requests] == sorted(
        answers[r["request_id"]].offset for r in requests)  # one conversation: in order


async def test_graceful_stop_finishes_in_flight_and_commits(harness: Any,
                                                             peer: PersonaPeer) -> None:
    gate = asyncio.Event()
    started = asyncio.Queue[str]()

    async def handler(event: VoiceRequested, context: HandlerContext) -> GenerationCompleted:
        await started.put(event.request_id)
        await gate.wait()
        return completed(event)

    loop = await harness.start([("voice", "voice", VoiceRequested, handler)])
    r = request("conv-stop", "in flight at stop")
    partition, offset = await peer.publish("voice", r)
    await asyncio.wait_for(started.get(), timeout=10)
    loop.request_stop()
    gate.set()
    await harness._task  # the loop drains, publishes and commits before returning
    answer = (await peer.answers_for([r["request_id"]]))[r["request_id"]]
    assert answer.kind == "completed"
    from aiokafka import TopicPartition

    tp = TopicPartition(harness.settings.topic("generation.requested.voice"), partition)
    assert await harness.consumer.committed(tp) == offset + 1


async def test_long_work_does_not_starve_heartbeats(harness: Any, peer: PersonaPeer,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    import logging
    import threading

    caplog.set_level(logging.INFO, logger="consumers.runtime")
    session_seconds = harness.settings.kafka_session_timeout_ms / 1000

    async def handler(event: VoiceRequested, context: HandlerContext) -> GenerationCompleted:
        # blocking work (as the GPU or an encoder would do) off the event loop, for longer
        # than the session timeout
        await asyncio.to_thread(threading.Event().wait, session_seconds * 1.5)
        return completed(event)

    await harness.start([("voice", "voice", VoiceRequested, handler)])
    r = request("conv-long", "long work")
    await peer.publish("voice", r)
    answers = await peer.answers_for([r["request_id"]], timeout=30)
    assert answers[r["request_id"]].kind == "completed"
    assert "partitions revoked" not in caplog.text  # the member was never kicked out


async def test_revoke_drops_unfinished_work_and_it_is_answered_after_rebalance(
    settings: Any, peer: PersonaPeer
) -> None:
    from tests.integration.conftest import LoopHarness

    invocations: list[str] = []
    first_started = asyncio.Event()
    cancelled = asyncio.Event()
    never = asyncio.Event()

    async def handler(event: VoiceRequested, context: HandlerContext) -> GenerationCompleted:
        invocations.append(event.request_id)
        first_started.set()
        if len(invocations) == 1:  # the first try hangs until the rebalance takes it away
            try:
                await never.wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise
        return completed(event)

    first, second = LoopHarness(settings), LoopHarness(settings)
    try:
        await first.start([("voice", "voice", VoiceRequested, handler)], rebalance_grace=0.2)
        await first.health.wait_until(lambda h: bool(h.assigned), timeout=20)
        r = request("conv-moved", "moved by a rebalance")
        await peer.publish("voice", r)
        await asyncio.wait_for(first_started.wait(), timeout=20)
        await second.start([("voice", "voice", VoiceRequested, handler)], rebalance_grace=0.2)
        await asyncio.wait_for(cancelled.wait(), timeout=20)  # dropped, not committed ...
        answer = (await peer.answers_for([r["request_id"]], timeout=30))[r["request_id"]]
        assert answer.kind == "completed"  # ... and answered by the partition's owner
        assert invocations == [r["request_id"], r["request_id"]]
    finally:
        await second.stop()
        await first.stop()



async def test_a_record_not_even_a_failed_event_can_answer_stops_the_loop_uncommitted(
    harness: Any, peer: PersonaPeer
) -> None:
    """Answers go out under the request's key. A key too large for the engine's producer
    (as for a broker with a smaller limit than the producer that wrote it) makes the
    completed event and the failed event standing in for it unpublishable: the loop must
    stop with an error (the process exits non-zero and is restarted), the record left
    uncommitted for redelivery, instead of moving on past a request nobody was told of."""
    async def handler(event: VoiceRequested, context: HandlerContext) -> GenerationCompleted:
        return completed(event)

    await harness.start([("voice", "voice", VoiceRequested, handler)], max_request_size=4096)
    r = request("conv-huge-key", "answered under its key")
    partition, offset = await peer.publish("voice", r, key="k" * 8192)
    with pytest.raises(RecordNotAnswerableError, match=f"partition={partition} offset={offset}"):
        await asyncio.wait_for(harness._task, timeout=30)
    harness.loop = None  # it has stopped; the fixture still closes its clients
    from aiokafka import TopicPartition

    tp = TopicPartition(harness.settings.topic("generation.requested.voice"), partition)
    assert await harness.consumer.committed(tp) in (None, offset)
    assert not peer.answers
