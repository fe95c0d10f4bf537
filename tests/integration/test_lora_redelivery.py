"""A LoRA training whose partition is revoked while its next chunk waits behind other GPU
work stops at once at its checkpoint (the waiting chunk dropped); its record comes back
(the same instance, after each of the rebalances a member joining and leaving makes). It
must be trained from the checkpoint, answered and committed: never lost with a stopped
run, its partition's commits never stuck behind it. (A record meeting a run that is still
stopping is joined to none: tests/core/test_training_stopping.py.)"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client import CollectorRegistry

from consumers.engine import Engine
from consumers.kafka import build_consumer
from consumers.security import KafkaSecurity
from consumers.serve import prepare_dev_model
from core.settings import Settings
from tests.integration.test_lora_training import WAIT, lora_request, of, trained
from tests.support.kafka_client import PersonaPeer

pytestmark = pytest.mark.kafka


async def committed(settings: Settings, tp: TopicPartition) -> int | None:
    """The group's committed offset of ``tp``, asked by a client that does not join."""
    assert settings.kafka_bootstrap_servers is not None
    reader = build_consumer(settings, settings.kafka_bootstrap_servers,
                            security=KafkaSecurity.from_settings(settings))
    await reader.start()
    try:
        return await reader.committed(tp)
    finally:
        await reader.stop()


async def test_a_lora_record_back_while_its_training_still_stops_is_trained_and_committed(
    settings: Settings, dev_model_dir: Path, tmp_path: Path, peer: PersonaPeer
) -> None:
    configured = trained(settings, dev_model_dir, tmp_path).model_copy(update={
        "lora_train_steps": 100, "rebalance_grace_seconds": 0.2})
    assert configured.kafka_bootstrap_servers is not None
    model_path = await asyncio.to_thread(prepare_dev_model, configured)
    engine = Engine(configured, configured.kafka_bootstrap_servers, model_path=model_path,
                    http_host="127.0.0.1", registry=CollectorRegistry())
    loop = asyncio.get_running_loop()
    held, gate, came_again = asyncio.Event(), threading.Event(), asyncio.Event()
    intruder: AIOKafkaConsumer | None = None
    await engine.start()
    try:
        assert engine.training is not None and engine._worker is not None
        train, calls = engine.training.train, []

        async def watched_train(request: Any, progress: Any = None) -> Any:
            calls.append(request.request_id)  # the training's decisions follow at once
            if len(calls) == 2:
                came_again.set()
            return await train(request, progress)

        engine.training.train = watched_train  # type: ignore[method-assign]
        await engine.health.wait_until(lambda h: bool(h.assigned), timeout=WAIT)
        everything = len(engine.health.assigned)
        asked = lora_request()
        partition, offset = await peer.publish("lora", asked)
        await peer.wait_for(of(asked, "progress"), timeout=WAIT)  # its first chunk runs

        def hold(_pipeline: Any) -> None:  # other GPU work, which the next chunk waits behind
            loop.call_soon_threadsafe(held.set)
            gate.wait(WAIT * 2)

        engine._worker.submit_exclusive(hold)
        await asyncio.wait_for(held.wait(), WAIT)

        # another member joins: the record's work is cancelled, its training stopped; then
        # it leaves, and the record comes back here
        intruder = build_consumer(configured, configured.kafka_bootstrap_servers,
                                  security=KafkaSecurity.from_settings(configured))
        await intruder.start()
        intruder.subscribe([configured.topic(f"generation.requested.{kind}")
                            for kind in ("image", "voice", "lora")])
        await engine.health.wait_until(lambda h: len(h.assigned) < everything, timeout=WAIT)
        await intruder.stop()
        intruder = None
        await asyncio.wait_for(came_again.wait(), WAIT)
        gate.set()  # the GPU is free for the resumed training

        answer = (await peer.answers_for([asked["request_id"]], timeout=WAIT))[
            asked["request_id"]]
        assert answer.kind == "completed", answer.event
        assert answer.event["lora_id"] == "mia_v1"
        assert len(calls) >= 2 and set(calls) == {asked["request_id"]}  # came back
    finally:
        gate.set()
        if intruder is not None:
            await intruder.stop()
        await engine.stop()
    tp = TopicPartition(configured.topic("generation.requested.lora"), partition)
    assert await committed(configured, tp) == offset + 1
