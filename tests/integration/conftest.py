"""Fixtures for tests against the real broker: settings on fresh topics, an in-process
engine, a consume loop with test handlers, and the Persona-side peer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from prometheus_client import CollectorRegistry

from consumers.engine import Engine
from consumers.kafka import build_consumer, build_producer, resolve_idempotence
from consumers.publisher import EventPublisher
from consumers.retry import RetryPolicy
from consumers.routes import Route
from consumers.runtime import ConsumeLoop, DeliveryConfig, ResultTopics
from consumers.security import KafkaSecurity
from core.health import EngineHealth
from core.metrics import EngineMetrics
from core.scheduling import Scheduling, build_scheduling
from core.settings import Settings
from schemas.codec import EventCodec
from tests.support.elevenlabs_server import ElevenLabsServer
from tests.support.kafka_client import PersonaPeer
from tests.support.settings import engine_settings

pytestmark = pytest.mark.kafka


@pytest.fixture
async def settings(
    tmp_path: Path, broker_bootstrap: str, topic_prefix: str, make_topics: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> Settings:
    monkeypatch.chdir(tmp_path)  # no stray .env
    await make_topics(partitions=3)
    return engine_settings(tmp_path, broker_bootstrap, topic_prefix)


@asynccontextmanager
async def running_engine(settings: Settings, **overrides: Any) -> AsyncIterator[Engine]:
    """An in-process engine on ``settings`` (a copy with ``overrides``, where given), its
    HTTP server on 127.0.0.1, started here and stopped on exit."""
    configured = settings.model_copy(update=overrides) if overrides else settings
    assert configured.kafka_bootstrap_servers is not None
    instance = Engine(configured, configured.kafka_bootstrap_servers, http_host="127.0.0.1",
                      registry=CollectorRegistry())
    await instance.start()
    try:
        yield instance
    finally:
        await instance.stop()


@pytest.fixture
async def engine(settings: Settings) -> AsyncIterator[Engine]:
    async with running_engine(settings) as instance:
        yield instance


@pytest.fixture
async def upstream() -> AsyncIterator[ElevenLabsServer]:
    """The local ElevenLabs server (tests/support), started and stopped around a test."""
    server = ElevenLabsServer()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def peer(settings: Settings) -> AsyncIterator[PersonaPeer]:
    assert settings.kafka_bootstrap_servers is not None
    async with PersonaPeer(settings.kafka_bootstrap_servers, settings.kafka_topic_prefix) as p:
        yield p


class LoopHarness:
    """A real consume loop on the real broker with handlers chosen by the test."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = EngineMetrics(CollectorRegistry())
        self.health = EngineHealth(voice_backend="none")
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.loop: ConsumeLoop | None = None
        self._task: Any = None

    async def start(self, routes: list[tuple[str, str, Any, Any]],
                    scheduling: Scheduling | None = None, *,
                    max_request_size: int | None = None, **config: Any) -> ConsumeLoop:
        """``max_request_size``: the engine's producer refuses records above it (aiokafka's
        own check), as a broker with a smaller message limit would."""
        import asyncio

        s = self.settings
        bootstrap = s.kafka_bootstrap_servers
        assert bootstrap is not None
        security = KafkaSecurity.from_settings(s)
        self.producer = build_producer(
            s, bootstrap, security=security,
            idempotent=await resolve_idempotence(s, bootstrap, security=security),
            **({} if max_request_size is None else {"max_request_size": max_request_size}),
        )
        self.consumer = build_consumer(s, bootstrap, security=security)
        await self.producer.start()
        await self.consumer.start()
        codec = EventCodec()
        self.loop = ConsumeLoop(
            self.consumer, EventPublisher(self.producer, codec, s.event_encoding), codec,
            [Route(s.topic(f"generation.requested.{kind}"), kind, model, handler)
             for kind, _, model, handler in routes],
            ResultTopics(s.topic("generation.completed"), s.topic("generation.failed"),
                         s.topic("generation.progress")),
            config=DeliveryConfig(**config),
            retry=RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.02),
            metrics=self.metrics, health=self.health,
            scheduling=scheduling or build_scheduling(s, self.metrics),
        )
        self._task = asyncio.create_task(self.loop.run())
        return self.loop

    async def stop(self) -> None:
        if self.loop is not None:
            self.loop.request_stop()
            await self._task
        if self.consumer is not None:
            await self.consumer.stop()
        if self.producer is not None:
            await self.producer.stop()


@pytest.fixture
async def harness(settings: Settings) -> AsyncIterator[LoopHarness]:
    h = LoopHarness(settings)
    try:
        yield h
    finally:
        await h.stop()

