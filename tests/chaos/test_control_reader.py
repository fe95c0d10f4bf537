"""The cancel reader on a broker with Kafka's Metadata semantics.

Found by this suite: on the mock broker (as on Apache Kafka), a Metadata request with an
empty topic list names no topic, and aiokafka's ``topics()`` does not refresh the
client's cached metadata, so the engine's ControlReader, which looked its topic up in that
cache, kept logging "control topic … not found yet" until aiokafka's periodic metadata
refresh (``metadata_max_age_ms``, 5 minutes), and every engine start waited its full
catch-up limit (10 s). Tansu answers an empty list with every topic, which hid it. The
reader now tracks its topic and waits for that metadata.

The reader is driven here as the engine builds it, without an engine around it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiokafka import AIOKafkaConsumer

from consumers.control import ControlReader
from consumers.kafka import build_control_consumer
from consumers.security import KafkaSecurity
from core.scheduling import PendingRequests
from core.settings import Settings
from schemas.codec import EventCodec

pytestmark = pytest.mark.kafka


@pytest.fixture
async def control_consumer(settings: Settings) -> AsyncIterator[AIOKafkaConsumer]:
    assert settings.kafka_bootstrap_servers is not None
    consumer = build_control_consumer(settings, settings.kafka_bootstrap_servers,
                                      security=KafkaSecurity.from_settings(settings))
    await consumer.start()
    try:
        yield consumer
    finally:
        await consumer.stop()


async def test_the_cancel_reader_is_ready_within_seconds(
    settings: Settings, control_consumer: AIOKafkaConsumer
) -> None:
    reader = ControlReader(control_consumer, settings.topic("generation.control"),
                           EventCodec(), PendingRequests(), lookback=60.0)
    reading = asyncio.create_task(reader.run())
    try:
        await asyncio.wait_for(reader.ready.wait(), timeout=3)
    finally:
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)
