"""Flow control on the real broker: a kind at its bound pauses only the partitions holding
their share of it, so one conversation's flood never stops the others of its kind."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.partitioner import DefaultPartitioner

from consumers.flow import FlowLimits
from consumers.routes import HandlerContext
from schemas.events import GenerationCompleted, VoiceRequested
from tests.support.kafka_client import PersonaPeer

pytestmark = pytest.mark.kafka

_BOUND = 20
_PARTITIONS = [0, 1, 2]  # the test topics' (tests/integration/conftest.py)


def request(conversation: str, text: str) -> dict[str, Any]:
    return {"request_id": str(uuid.uuid4()), "conversation_id": conversation, "text": text}


def key_on(partitions: set[int], avoiding: set[int]) -> str:
    """A conversation id whose records go to one of ``partitions``, none of ``avoiding``."""
    return next(key for key in (f"conv-{i}" for i in range(1000))
                if (p := DefaultPartitioner()(key.encode(), _PARTITIONS, _PARTITIONS))
                in partitions and p not in avoiding)


async def start(harness: Any, flooding: set[str]) -> Any:
    """A voice loop bounded at ``_BOUND`` records whose ``flooding`` conversations wait
    (each its first request at work, the rest behind it) until ``harness.gate`` is set."""
    harness.gate = asyncio.Event()

    async def handler(event: VoiceRequested, context: HandlerContext) -> GenerationCompleted:
        if event.conversation_id in flooding:
            await harness.gate.wait()
        return GenerationCompleted(request_id=event.request_id,
                                   conversation_id=event.conversation_id, kind="voice",
                                   text=event.text)

    return await harness.start([("voice", "voice", VoiceRequested, handler)],
                               flow=FlowLimits(max_records=_BOUND))


async def test_a_flooding_conversation_pauses_only_its_own_partition(
        harness: Any, peer: PersonaPeer) -> None:
    flood_key = key_on(set(_PARTITIONS), set())
    loop = await start(harness, {flood_key})
    topic = harness.settings.topic("generation.requested.voice")
    flood = [request(flood_key, f"f{i}") for i in range(3 * _BOUND)]
    flooded = {(await peer.publish("voice", r))[0] for r in flood}.pop()
    await harness.health.wait_until(lambda h: h.paused_kinds == ["voice"], timeout=10)
    assert harness.consumer.paused() == {TopicPartition(topic, flooded)}

    quiet = request(key_on(set(_PARTITIONS), {flooded}), "quiet")
    await peer.publish("voice", quiet)
    answer = (await peer.answers_for([quiet["request_id"]], timeout=15))[quiet["request_id"]]
    # answered while the whole flood waits, its partition still held back
    assert answer.kind == "completed"
    flood_ids = {r["request_id"] for r in flood}
    assert not [a for a in peer.answers if a.event.get("request_id") in flood_ids]
    assert harness.consumer.paused() == {TopicPartition(topic, flooded)}
    assert harness.health.paused_kinds == ["voice"]
    assert loop.in_flight <= 2 * _BOUND

    harness.gate.set()
    answers = await peer.answers_for([r["request_id"] for r in flood], timeout=60)
    assert [answers[r["request_id"]].offset for r in flood] == sorted(
        answers[r["request_id"]].offset for r in flood)  # one conversation: in order
    await harness.health.wait_until(lambda h: h.paused_kinds == [], timeout=10)
    assert not harness.consumer.paused()


async def test_floods_on_two_partitions_stay_bounded_and_leave_the_third_open(
        harness: Any, peer: PersonaPeer) -> None:
    first = key_on(set(_PARTITIONS), set())
    first_partition = DefaultPartitioner()(first.encode(), _PARTITIONS, _PARTITIONS)
    second = key_on(set(_PARTITIONS), {first_partition})
    loop = await start(harness, {first, second})
    topic = harness.settings.topic("generation.requested.voice")
    floods = [request(key, f"{key}-{i}") for key in (first, second) for i in range(2 * _BOUND)]
    flooded = {TopicPartition(topic, (await peer.publish("voice", r))[0]) for r in floods}
    assert len(flooded) == 2
    await harness.health.wait_until(lambda h: harness.consumer.paused() == flooded,
                                    timeout=10)
    # held: at most the bound plus each partition's share (20 // 3 records each)
    assert loop.in_flight <= _BOUND + len(_PARTITIONS) * (_BOUND // len(_PARTITIONS))

    third = set(_PARTITIONS) - {tp.partition for tp in flooded}
    quiet = request(key_on(third, set()), "quiet")
    await peer.publish("voice", quiet)
    answer = (await peer.answers_for([quiet["request_id"]], timeout=15))[quiet["request_id"]]
    assert answer.kind == "completed"
    flood_ids = {r["request_id"] for r in floods}
    assert not [a for a in peer.answers if a.event.get("request_id") in flood_ids]
    assert harness.consumer.paused() == flooded

    harness.gate.set()
    await peer.answers_for(list(flood_ids), timeout=60)
    await harness.health.wait_until(lambda h: h.paused_kinds == [], timeout=10)
