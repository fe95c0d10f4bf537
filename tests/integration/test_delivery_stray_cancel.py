"""A cancellation the consume loop did not ask for (no revoke, no stop), raised by a
record's work that stopped on its own, never drops the record: it is answered again, or
failed INTERNAL, and its partition's commits move on. Only a stop leaves it uncommitted."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka import TopicPartition

from consumers.routes import HandlerContext
from schemas.events import GenerationCompleted, VoiceRequested
from tests.integration.test_delivery import completed, request
from tests.support.kafka_client import PersonaPeer

pytestmark = pytest.mark.kafka


def voice_partition(harness: Any, partition: int) -> TopicPartition:
    return TopicPartition(harness.settings.topic("generation.requested.voice"), partition)


async def test_work_stopping_on_its_own_is_answered_again_in_order_and_committed(
    harness: Any, peer: PersonaPeer
) -> None:
    runs: list[str] = []

    async def handler(event: VoiceRequested, context: HandlerContext) -> GenerationCompleted:
        runs.append(event.text)
        if runs.count(event.text) == 1 and event.text == "stops once":
            raise asyncio.CancelledError("the work stopped, nobody cancelled the record")
        return completed(event)

    loop = await harness.start([("voice", "voice", VoiceRequested, handler)])
    first, later = request("conv-stray", "stops once"), request("conv-stray", "comes after")
    partition, offset = await peer.publish("voice", first)
    await peer.publish("voice", later)
    answers = await peer.answers_for([first["request_id"], later["request_id"]], timeout=20)
    assert answers[first["request_id"]].kind == answers[later["request_id"]].kind == "completed"
    assert answers[first["request_id"]].offset < answers[later["request_id"]].offset
    assert runs == ["stops once", "stops once", "comes after"]  # its turn kept meanwhile

    loop.request_stop()
    await harness._task  # the final commit
    assert await harness.consumer.committed(voice_partition(harness, partition)) == offset + 2


async def test_work_that_keeps_stopping_on_its_own_fails_internal_and_is_committed(
    harness: Any, peer: PersonaPeer
) -> None:
    async def handler(event: VoiceRequested, context: HandlerContext) -> GenerationCompleted:
        raise asyncio.CancelledError("the work stopped, nobody cancelled the record")

    loop = await harness.start([("voice", "voice", VoiceRequested, handler)])
    r = request("conv-stray-always", "always stops")
    partition, offset = await peer.publish("voice", r)
    answer = (await peer.answers_for([r["request_id"]], timeout=20))[r["request_id"]]
    assert answer.kind == "failed"
    assert answer.event["error_code"] == "INTERNAL" and answer.event["retryable"] is True
    assert answer.event["attempts"] == 3  # the harness's RETRY_MAX_ATTEMPTS
    assert answer.event["conversation_id"] == "conv-stray-always"

    loop.request_stop()
    await harness._task
    assert await harness.consumer.committed(voice_partition(harness, partition)) == offset + 1


async def test_work_stopping_because_the_engine_stops_stays_uncommitted(
    harness: Any, peer: PersonaPeer
) -> None:
    started, stopping = asyncio.Event(), asyncio.Event()

    async def handler(event: VoiceRequested, context: HandlerContext) -> GenerationCompleted:
        started.set()
        await stopping.wait()  # as a training does: it checkpoints and stops with the engine
        raise asyncio.CancelledError("the engine is stopping")

    loop = await harness.start([("voice", "voice", VoiceRequested, handler)])
    r = request("conv-stop", "stopped with the engine")
    partition, offset = await peer.publish("voice", r)
    await asyncio.wait_for(started.wait(), timeout=20)
    loop.request_stop()
    stopping.set()
    await harness._task
    assert await harness.consumer.committed(voice_partition(harness, partition)) in (
        None, offset)  # redelivered after the restart, resumed there
    assert not peer.answers
