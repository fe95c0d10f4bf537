"""Fixtures of the chaos suite: a librdkafka mock broker of each module's own (faults
taken on it touch no other test), settings with short Kafka timeouts, an in-process
engine and the Persona-side peer.

The session's Tansu broker is never used here: only the mock can be taken down, brought
back on the same port and made to answer requests with errors (docs/brokers.md). The
mock cannot form a group of two members, so every test runs one engine at a time.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from consumers.broker import RdkafkaMockBroker
from consumers.engine import Engine
from consumers.topics import CONTRACT_TOPICS
from core.settings import Settings
from tests.support.kafka_client import PersonaPeer
from tests.support.mock_broker import module_mock_broker
from tests.support.settings import engine_settings

#: Partitions of every topic; the engine owns all of them once :func:`engine` returns.
PARTITIONS = 3
#: The engine's Kafka session; the mock holds every rebalance for this minus one second.
SESSION_MS = 2000


@pytest.fixture(scope="module")
def _module_broker() -> Iterator[RdkafkaMockBroker]:
    yield from module_mock_broker()


@pytest.fixture
def mock_broker(_module_broker: RdkafkaMockBroker) -> Iterator[RdkafkaMockBroker]:
    """The module's mock broker, up; brought up again after the test whatever it did."""
    _module_broker.set_up()
    yield _module_broker
    _module_broker.set_up()


@pytest.fixture
def settings(tmp_path: Path, mock_broker: RdkafkaMockBroker, topic_prefix: str,
             monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Engine settings on fresh topics of the mock broker: short session, heartbeats and
    retry delays, so that recovery after a fault takes about a second."""
    monkeypatch.chdir(tmp_path)  # no stray .env
    mock_broker.create_topics([f"{topic_prefix}{t}" for t in CONTRACT_TOPICS], PARTITIONS)
    return engine_settings(tmp_path, mock_broker.bootstrap_servers, topic_prefix,
                         kafka_session_timeout_ms=SESSION_MS, shutdown_grace_seconds=5)


@pytest.fixture
async def engine(settings: Settings, mock_broker: RdkafkaMockBroker) -> AsyncIterator[Engine]:
    """The engine in this process (voice route only), started and owning every partition
    of its input topic. ``/health`` follows the broker within about a second."""
    assert settings.kafka_bootstrap_servers is not None
    # The watch interval is also its metadata request's timeout: shorter ones read a
    # busy 2-core machine as an outage.
    instance = Engine(settings, settings.kafka_bootstrap_servers, http_host="127.0.0.1",
                      registry=CollectorRegistry(), broker_watch_interval=1.0)
    await instance.start()
    try:
        await instance.health.wait_until(lambda h: len(h.assigned) == PARTITIONS, timeout=20)
        yield instance
    finally:
        # a test that failed mid-outage: give the broker back first, so the stop is quick
        await asyncio.to_thread(mock_broker.set_up)
        await asyncio.wait_for(instance.stop(), timeout=60)


@pytest.fixture
async def peer(settings: Settings) -> AsyncIterator[PersonaPeer]:
    assert settings.kafka_bootstrap_servers is not None
    async with PersonaPeer(settings.kafka_bootstrap_servers, settings.kafka_topic_prefix) as p:
        yield p
