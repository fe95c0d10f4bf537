"""The configs the engine gives the topics it creates (TOPIC_CONFIGS, as create-topics.sh
gives them on compose), read back from the broker with DescribeConfigs; an existing topic
is left alone, with a warning when its records are capped too small."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from consumers.topics import CONTRACT_TOPICS, TOPIC_CONFIGS, ensure_topics, topic_configs
from tests.support.kafka_security import security_for

pytestmark = pytest.mark.kafka

LORA = "generation.requested.lora"


async def described(bootstrap: str, names: Sequence[str]) -> dict[str, dict[str, str]]:
    """Each topic's configs as the broker reports them."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap,
                                **security_for(bootstrap).options())
    await admin.start()
    try:
        responses = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, name) for name in names])
    finally:
        await admin.close()
    return {resource[3]: {entry[0]: entry[1] for entry in resource[4]}
            for response in responses for resource in response.resources}


def test_prefixed_names_get_their_contract_topic_configs() -> None:
    assert topic_configs(f"prod.{LORA}") == {"max.message.bytes": "16777216"}
    assert topic_configs("generation.control") == {"retention.ms": "86400000"}
    assert topic_configs("prod.generation.requested.image") == {}
    assert topic_configs("something.else") == {}


async def test_created_topics_carry_the_configs(broker_bootstrap: str,
                                                topic_prefix: str) -> None:
    names = [topic_prefix + topic for topic in CONTRACT_TOPICS]
    created = await ensure_topics(broker_bootstrap, names, 2,
                                  security=security_for(broker_bootstrap))
    assert created == names
    configs = await described(broker_bootstrap, names)
    for topic, wanted in TOPIC_CONFIGS.items():
        got = configs[topic_prefix + topic]
        assert {key: got.get(key) for key in wanted} == wanted, topic
    assert configs[topic_prefix + LORA]["max.message.bytes"] == str(16 * 2**20)
    assert configs[topic_prefix + "generation.progress"]["retention.ms"] == "86400000"


async def test_an_existing_topic_is_left_alone_with_a_warning_when_its_records_are_capped(
        broker_bootstrap: str, topic_prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "consumers.topics")
    lora = topic_prefix + LORA
    admin = AIOKafkaAdminClient(bootstrap_servers=broker_bootstrap,
                                **security_for(broker_bootstrap).options())
    await admin.start()
    try:  # as an operator (or Apache Kafka's default) left it: about 1 MiB
        await admin.create_topics([NewTopic(lora, 1, 1,
                                            topic_configs={"max.message.bytes": "1048588"})])
    finally:
        await admin.close()

    assert await ensure_topics(broker_bootstrap, [lora], 2,
                               security=security_for(broker_bootstrap)) == []
    assert (await described(broker_bootstrap, [lora]))[lora]["max.message.bytes"] == "1048588"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"topic {lora} exists with max.message.bytes=1048588" in w
               and "--add-config max.message.bytes=16777216" in w for w in warnings), warnings
