"""The Persona-side peer checks every record it reads against docs/asyncapi.yaml
(:mod:`tests.support.asyncapi_check`), so every integration test that reads answers holds
the engine's traffic to the document; here a record that does not fit is caught."""

from __future__ import annotations

import json

import pytest
from aiokafka import AIOKafkaProducer

from core.settings import Settings
from tests.support.kafka_client import PersonaPeer
from tests.support.kafka_security import client_options

pytestmark = pytest.mark.kafka


async def test_a_record_that_does_not_fit_the_document_is_caught(settings: Settings) -> None:
    assert settings.kafka_bootstrap_servers is not None
    with pytest.raises(AssertionError, match="do not fit docs/asyncapi.yaml"):
        async with PersonaPeer(settings.kafka_bootstrap_servers,
                               settings.kafka_topic_prefix) as peer:
            await _publish_and_see_it_caught(settings, peer)


async def _publish_and_see_it_caught(settings: Settings, peer: PersonaPeer) -> None:
    assert settings.kafka_bootstrap_servers is not None
    wrong = {"request_id": "not-documented", "conversation_id": "c", "kind": "image",
             "timestamp": "2024-01-01T00:00:00Z", "thumbnail": "a field nobody documented"}
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers,
                                **client_options(settings.kafka_bootstrap_servers or ""))
    await producer.start()
    try:
        await producer.send_and_wait(
            settings.topic("generation.completed"), json.dumps(wrong).encode(), key=b"c",
            headers=[("content-type", b"application/json"), ("request_id", b"not-documented")])
    finally:
        await producer.stop()
    await peer.wait_for(lambda a: a.event.get("request_id") == "not-documented", timeout=30)
    assert len(peer.violations) == 1
    assert "'thumbnail' was unexpected" in peer.violations[0]
    assert settings.topic("generation.completed") in peer.violations[0]
