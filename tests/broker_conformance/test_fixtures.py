"""The root conftest's broker fixtures: what every Kafka test of the project builds on."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from consumers.topics import CONTRACT_TOPICS
from tests.support.kafka_security import client_options

pytestmark = pytest.mark.kafka


async def test_make_topics_creates_the_contract_topics_under_the_prefix(
    broker_bootstrap: str,
    topic_prefix: str,
    make_topics: Callable[..., Awaitable[dict[str, str]]],
) -> None:
    topics = await make_topics(partitions=2)
    assert topics == {name: f"{topic_prefix}{name}" for name in CONTRACT_TOPICS}
    assert await make_topics(partitions=2) == topics  # existing topics are fine
    admin = AIOKafkaAdminClient(bootstrap_servers=broker_bootstrap, **client_options(broker_bootstrap))
    await admin.start()
    try:
        described = await admin.describe_topics(list(topics.values()))
    finally:
        await admin.close()
    assert {t["topic"]: len(t["partitions"]) for t in described} == {
        name: 2 for name in topics.values()
    }


def test_topic_prefixes_differ_between_tests(topic_prefix: str) -> None:
    assert topic_prefix.startswith("t") and topic_prefix.endswith(".")
    assert len(topic_prefix) == 10
