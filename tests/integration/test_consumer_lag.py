"""The consumer lag gauge on the real broker: true while flow control pauses partitions,
when the backlog grows and no fetch brings the partitions' high watermark."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from aiokafka.partitioner import DefaultPartitioner

from consumers.flow import FlowLimits
from consumers.routes import HandlerContext
from core.metrics import EngineMetrics
from schemas.events import GenerationCompleted, VoiceRequested
from tests.support.kafka_client import PersonaPeer

pytestmark = pytest.mark.kafka


def request(conversation: str, text: str) -> dict[str, Any]:
    return {"request_id": str(uuid.uuid4()), "conversation_id": conversation, "text": text}


async def lag_reaches(metrics: EngineMetrics, topic: str, partition: int, records: float,
                      timeout: float = 15.0) -> None:
    """Waits until the lag gauge of ``topic[partition]`` reads ``records``."""
    labels = {"topic": topic, "partition": str(partition)}

    def lag() -> float | None:
        return metrics.registry.get_sample_value("engine_consumer_lag_records", labels)

    try:
        async with asyncio.timeout(timeout):
            while lag() != records:
                await asyncio.sleep(0.02)
    except TimeoutError:
        pytest.fail(f"lag of {topic}[{partition}] is {lag()}, not {records}, "
                    f"after {timeout}s")


async def test_lag_counts_the_backlog_of_paused_partitions(harness: Any,
                                                           peer: PersonaPeer) -> None:
    gate = asyncio.Event()
    started = asyncio.Queue[str]()

    async def handler(event: VoiceRequested, context: HandlerContext) -> GenerationCompleted:
        await started.put(event.text)
        await gate.wait()
        return GenerationCompleted(request_id=event.request_id,
                                   conversation_id=event.conversation_id, kind="voice",
                                   text=event.text)

    await harness.start([("voice", "voice", VoiceRequested, handler)],
                        flow=FlowLimits(max_records=3), lag_refresh_interval=0.1)
    topic = harness.settings.topic("generation.requested.voice")
    first = [request("conv-busy", f"r{i}") for i in range(8)]
    busy = {(await peer.publish("voice", r))[0] for r in first}.pop()
    await asyncio.wait_for(started.get(), timeout=10)
    await harness.health.wait_until(lambda h: h.paused_kinds == ["voice"], timeout=10)
    # more arrives while the kind is paused: on the partition it was reading, and on one
    # none of whose records it has fetched yet
    partitions = list(range(3))
    idle_key = next(key for key in (f"conv-{i}" for i in range(100))
                    if DefaultPartitioner()(key.encode(), partitions, partitions) != busy)
    more = [request("conv-busy", f"r{i}") for i in range(8, 28)]
    idle = [request(idle_key, f"q{i}") for i in range(5)]
    for r in more + idle:
        await peer.publish("voice", r)
    idle_partition = DefaultPartitioner()(idle_key.encode(), partitions, partitions)

    await lag_reaches(harness.metrics, topic, busy, 28)  # nothing answered: all of it
    await lag_reaches(harness.metrics, topic, idle_partition, 5)
    assert harness.health.paused_kinds == ["voice"]  # still paused: not learnt by fetching

    gate.set()
    await peer.answers_for([r["request_id"] for r in first + more + idle], timeout=60)
    await lag_reaches(harness.metrics, topic, busy, 0)
    await lag_reaches(harness.metrics, topic, idle_partition, 0)
