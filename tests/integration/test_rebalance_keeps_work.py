"""GPU work is not thrown away by a rebalance: an image still running when its partition
is revoked finishes into the result cache, and the record's next delivery answers from
it (or joins it) without computing it again. A voice in flight is kept the same way (one
upstream call, one stream). Kept work stays cancellable: a cancel stops it."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.partitioner import murmur2
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from consumers.engine import Engine
from consumers.kafka import build_consumer
from consumers.security import KafkaSecurity
from consumers.serve import prepare_dev_model
from core.settings import Settings
from tests.integration.conftest import running_engine
from tests.support.elevenlabs_server import DEFAULT_KEY, ElevenLabsServer
from tests.support.kafka_client import PersonaPeer

pytestmark = pytest.mark.kafka

KINDS = ("image", "voice", "lora")


@asynccontextmanager
async def dev_engine(settings: Settings, dev_model_dir: Path, tmp_path: Path
                     ) -> AsyncIterator[Engine]:
    """An engine on the tiny development model with a short rebalance grace (0.2 s), its
    nine partitions assigned."""
    configured = settings.model_copy(update={
        "dev_model_dir": dev_model_dir, "lora_output_dir": tmp_path / "loras",
        "progress_interval": 0.0, "rebalance_grace_seconds": 0.2, "batch_window_ms": 0})
    model_path = await asyncio.to_thread(prepare_dev_model, configured)
    assert configured.kafka_bootstrap_servers is not None
    engine = Engine(configured, configured.kafka_bootstrap_servers, model_path=model_path,
                    http_host="127.0.0.1", registry=CollectorRegistry())
    await engine.start()
    try:
        await engine.health.wait_until(lambda h: len(h.assigned) == 9, timeout=30)
        yield engine
    finally:
        await engine.stop()


@asynccontextmanager
async def member_joined(settings: Settings, engine: Engine, kinds: tuple[str, ...] = KINDS
                        ) -> AsyncIterator[None]:
    """A second member joins the engine's group (the engine's partitions are revoked, some
    go to the newcomer) and, on exit, leaves without answering anything (the engine gets
    them all back). The engine's own consumer: a member that offers another assignor is
    refused."""
    assert settings.kafka_bootstrap_servers is not None
    owned = len(engine.health.assigned)
    intruder: AIOKafkaConsumer = build_consumer(
        settings, settings.kafka_bootstrap_servers,
        security=KafkaSecurity.from_settings(settings))
    await intruder.start()
    try:
        intruder.subscribe([settings.topic(f"generation.requested.{k}") for k in kinds])
        await engine.health.wait_until(lambda h: 0 < len(h.assigned) < owned, timeout=30)
        yield
    finally:
        await intruder.stop()


def on_partition(partition: int, prefix: str) -> str:
    """A conversation id whose records go to ``partition`` of a three-partition topic (the
    producer's default partitioner). When a member joins an engine holding all three, the
    balanced sticky assignor leaves 0 and 1 with the engine and gives 2 to the newcomer."""
    return next(f"{prefix}-{i}" for i in range(1000)
                if (murmur2(f"{prefix}-{i}".encode()) & 0x7FFFFFFF) % 3 == partition)


def image(conversation: str, *, size: int, steps: int) -> dict[str, Any]:
    return {"request_id": str(uuid.uuid4()), "conversation_id": conversation,
            "prompt": "a portrait", "width": size, "height": size,
            "num_inference_steps": steps, "optimize_prompt": False}


async def test_an_image_running_at_a_revoke_is_computed_once(
    settings: Settings, dev_model_dir: Path, tmp_path: Path, peer: PersonaPeer
) -> None:
    async with dev_engine(settings, dev_model_dir, tmp_path) as engine:
        request = image("moved-around", size=1024, steps=12)
        await peer.publish("image", request)
        await peer.wait_for(lambda a: a.kind == "progress"
                            and a.event["request_id"] == request["request_id"], timeout=60)
        # the image runs while its partition is revoked (grace 0.2 s)
        async with member_joined(settings, engine):
            owned = {(t, str(p)) for t, p in engine.health.assigned}
            lag = {(s.labels["topic"], s.labels["partition"])
                   for metric in engine.metrics.registry.collect()
                   if metric.name == "engine_consumer_lag_records" for s in metric.samples}
            assert lag <= owned  # no gauge left for a partition another member owns now
        answer = (await peer.answers_for([request["request_id"]], timeout=120))[
            request["request_id"]]
        assert answer.kind == "completed", answer.event
        images = engine.metrics.registry.get_sample_value("engine_image_batch_size_sum")
        assert images == 1  # computed once, though delivered twice
        assert len([a for a in peer.answers if a.kind == "completed"
                    and a.event["request_id"] == request["request_id"]]) == 1


async def test_a_cancel_stops_an_image_kept_across_a_revoke(
    settings: Settings, dev_model_dir: Path, tmp_path: Path, peer: PersonaPeer
) -> None:
    async with dev_engine(settings, dev_model_dir, tmp_path) as engine:
        assert engine.addresses is not None
        request = image(on_partition(2, "leaving"), size=1024, steps=24)
        rid = request["request_id"]
        partition, _ = await peer.publish("image", request)
        await peer.wait_for(lambda a: a.kind == "progress" and a.event["request_id"] == rid,
                            timeout=60)
        url = f"{engine.addresses.http_url}/requests/{rid}"
        async with member_joined(settings, engine):
            # the newcomer holds the record (not delivered here again meanwhile); the running
            # image is kept for its next delivery, and is still this instance's to cancel
            assert (settings.topic("generation.requested.image"), partition) \
                not in engine.health.assigned
            async with aiohttp.ClientSession() as session, session.delete(url) as response:
                assert response.status == 200, await response.text()  # not a 404
                assert (await response.json())["cancelled_here"] == 1
        answer = (await peer.answers_for([rid], timeout=120))[rid]
        assert answer.kind == "failed" and answer.event["error_code"] == "CANCELLED"
        # the GPU takes the next image only once the cancelled one stopped
        after = image("next-user", size=1024, steps=2)
        await peer.publish("image", after)
        done = (await peer.answers_for([after["request_id"]], timeout=120))[
            after["request_id"]]
        assert done.kind == "completed", done.event
        written = sorted(p.name for p in engine.store.directory.iterdir()
                         if p.suffix == ".png")
        assert written == [done.event["filename"]]  # none for the cancelled request
        assert engine.scheduling.pending.find(rid) == []  # its registration is gone


async def test_a_voice_in_flight_at_a_rebalance_is_neither_cut_nor_paid_twice(
    settings: Settings, peer: PersonaPeer
) -> None:
    server = ElevenLabsServer(seconds_per_char=0.05, time_to_first_chunk=0.2,
                              chunk_interval=0.2, chunk_bytes=512)
    await server.start()
    try:
        async with running_engine(settings, voice_backend="elevenlabs",
                                  elevenlabs_api_key=SecretStr(DEFAULT_KEY),
                                  elevenlabs_api_url=server.api_url,
                                  rebalance_grace_seconds=0.2) as engine:
            await engine.health.wait_until(lambda h: len(h.assigned) == 3, timeout=30)
            request = {"request_id": str(uuid.uuid4()),
                       "conversation_id": on_partition(0, "c-voice"),
                       "text": "Hello there, my friend. It is good to hear you again! " * 3,
                       "inject_emotion": False}
            rid = request["request_id"]
            await peer.publish("voice", request)
            await peer.wait_for(lambda a: a.kind == "progress", timeout=30)
            # eager rebalances (a member joins, then leaves): every partition revoked twice,
            # the voice's given back to this instance each time, which joins the voice it
            # kept instead of cutting it and asking for it again
            async with member_joined(settings, engine, ("voice",)):
                assert (settings.topic("generation.requested.voice"), 0) \
                    in engine.health.assigned
            answer = (await peer.answers_for([rid], timeout=120))[rid]
            assert answer.kind == "completed", answer.event
            progress = [a.event for a in peer.answers
                        if a.kind == "progress" and a.event["request_id"] == rid]
            assert server.tts_calls == 1  # paid once
            assert server.abandoned.empty()  # never cut
            assert len(progress) == 1 and progress[0]["stream_url"]  # published once
            assert engine.scheduling.pending.find(rid) == []
    finally:
        await server.stop()
