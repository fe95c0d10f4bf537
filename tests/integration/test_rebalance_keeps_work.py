"""GPU work is not thrown away by a rebalance: an image still running when its partition
is revoked finishes into the result cache, and the record's next delivery answers from
it (or joins it) without computing it again."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from prometheus_client import CollectorRegistry

from consumers.engine import Engine
from consumers.kafka import build_consumer
from consumers.security import KafkaSecurity
from consumers.serve import prepare_dev_model
from core.settings import Settings
from tests.support.kafka_client import PersonaPeer

pytestmark = pytest.mark.kafka


async def test_an_image_running_at_a_revoke_is_computed_once(
    settings: Settings, dev_model_dir: Path, tmp_path: Path, peer: PersonaPeer
) -> None:
    configured = settings.model_copy(update={
        "dev_model_dir": dev_model_dir, "lora_output_dir": tmp_path / "loras",
        "progress_interval": 0.0, "rebalance_grace_seconds": 0.2})
    model_path = await asyncio.to_thread(prepare_dev_model, configured)
    assert configured.kafka_bootstrap_servers is not None
    engine = Engine(configured, configured.kafka_bootstrap_servers, model_path=model_path,
                    http_host="127.0.0.1", registry=CollectorRegistry())
    await engine.start()
    intruder: AIOKafkaConsumer | None = None
    try:
        await engine.health.wait_until(lambda h: len(h.assigned) == 9, timeout=30)
        request: dict[str, Any] = {
            "request_id": str(uuid.uuid4()), "conversation_id": "moved-around",
            "prompt": "a portrait", "width": 1024, "height": 1024,
            "num_inference_steps": 12, "optimize_prompt": False}
        await peer.publish("image", request)
        await peer.wait_for(lambda a: a.kind == "progress"
                            and a.event["request_id"] == request["request_id"], timeout=60)
        # a second member joins the group: the engine's partitions are revoked while the
        # image runs (grace 0.2 s), and some go to the newcomer ...
        # (the engine's own consumer: a member that offers another assignor is refused)
        intruder = build_consumer(configured, configured.kafka_bootstrap_servers,
                                  security=KafkaSecurity.from_settings(configured))
        await intruder.start()
        intruder.subscribe(
            [configured.topic(f"generation.requested.{k}") for k in ("image", "voice", "lora")])
        await engine.health.wait_until(lambda h: len(h.assigned) < 9, timeout=30)
        owned = {(t, str(p)) for t, p in engine.health.assigned}
        lag = {(s.labels["topic"], s.labels["partition"])
               for metric in engine.metrics.registry.collect()
               if metric.name == "engine_consumer_lag_records" for s in metric.samples}
        assert lag <= owned  # no gauge left for a partition another member owns now
        # ... which leaves without answering anything: the engine gets them all back
        await intruder.stop()
        intruder = None
        answer = (await peer.answers_for([request["request_id"]], timeout=120))[
            request["request_id"]]
        assert answer.kind == "completed", answer.event
        images = engine.metrics.registry.get_sample_value("engine_image_batch_size_sum")
        assert images == 1  # computed once, though delivered twice
        assert len([a for a in peer.answers if a.kind == "completed"
                    and a.event["request_id"] == request["request_id"]]) == 1
    finally:
        if intruder is not None:
            await intruder.stop()
        await engine.stop()
