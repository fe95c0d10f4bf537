"""One service on several instances: engines on one broker and one group, each with its
own empty folders and no shared disk, sharing one S3-protocol store (moto on 127.0.0.1).
Any instance serves any output, byte for byte; a replay whose partition moved to another
instance costs no GPU and no voice work and answers with the same URL."""

from __future__ import annotations

import asyncio
import re
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiokafka.partitioner import DefaultPartitioner
from prometheus_client import CollectorRegistry

from consumers.engine import Engine
from consumers.serve import prepare_dev_model
from core.lora.shared import SharedLoras
from core.settings import Settings
from core.storage import build_object_store
from core.training.intake import spec_identity
from schemas.events import LoraTrainingRequested
from tests.core.test_training_images import photos
from tests.integration.test_lora_training import lora_request
from tests.support.engine_process import EngineProcess
from tests.support.kafka_client import PersonaPeer
from tests.support.kafka_security import security_env
from tests.support.s3_server import S3Server, StoreLocation

pytestmark = pytest.mark.kafka

MakeEngines = Callable[..., Awaitable[list[Engine]]]
_PARTITIONS = 9  # image, voice and lora topics, 3 partitions each
_OUTPUT = re.compile(r"[0-9a-f-]{36}\.(png|jpg|webp|mp3|wav)")


@pytest.fixture
async def make_fleet(settings: Settings, dev_model_dir: Path, tmp_path: Path,
                     s3_store: StoreLocation) -> AsyncIterator[MakeEngines]:
    engines: list[Engine] = []

    async def make(count: int, **overrides: Any) -> list[Engine]:
        for n in range(count):
            own = tmp_path / f"instance-{n}"  # nothing shared on disk
            configured = settings.model_copy(update={
                "dev_model_dir": dev_model_dir, "output_dir": own / "outputs",
                "lora_output_dir": own / "loras", "temp_dir": own / "temp",
                "storage_url": s3_store.url, "storage_endpoint_url": s3_store.endpoint,
                "progress_interval": 0.0, "batch_window_ms": 0, **overrides})
            model_path = await asyncio.to_thread(prepare_dev_model, configured)
            assert configured.kafka_bootstrap_servers is not None
            engine = Engine(configured, configured.kafka_bootstrap_servers,
                            model_path=model_path, http_host="127.0.0.1",
                            registry=CollectorRegistry())
            engines.append(engine)
            await engine.start()
        await settled(engines)
        return list(engines)

    yield make
    for engine in engines:
        await engine.stop()


async def settled(engines: list[Engine], timeout: float = 60) -> None:
    """Waits until the running ``engines`` own every partition, each some; woken by every
    change of an assignment (no polling)."""
    def done() -> bool:
        return sum(len(e.health.assigned) for e in engines) == _PARTITIONS \
            and all(e.health.assigned for e in engines)

    async def owned() -> None:
        while not done():
            changes = [asyncio.create_task(e.health.wait_until(
                lambda h, before=list(e.health.assigned): list(h.assigned) != before,
                timeout)) for e in engines]
            _, waiting = await asyncio.wait(changes, return_when=asyncio.FIRST_COMPLETED)
            for task in waiting:
                task.cancel()
            await asyncio.gather(*changes, return_exceptions=True)

    await asyncio.wait_for(owned(), timeout)


def gpu_runs(engine: Engine) -> float:
    return engine.metrics.registry.get_sample_value("engine_image_batch_size_sum") or 0.0


def outputs_on_disk(engine: Engine) -> set[str]:
    return {p.name for p in engine.store.directory.iterdir() if _OUTPUT.fullmatch(p.name)}


async def fetch(engine: Engine, url: str, **headers: str) -> httpx.Response:
    assert engine.addresses is not None
    async with httpx.AsyncClient(base_url=engine.addresses.http_url) as client:
        return await client.get(url, headers=headers)


def image(conversation: str) -> dict[str, Any]:
    return {"request_id": str(uuid.uuid4()), "conversation_id": conversation,
            "prompt": "a portrait of a woman in a cafe", "width": 64, "height": 64,
            "num_inference_steps": 2, "optimize_prompt": False}


def voice(conversation: str) -> dict[str, Any]:
    return {"request_id": str(uuid.uuid4()), "conversation_id": conversation,
            "text": "Hello, I'm Sarah!", "inject_emotion": False}


async def test_every_instance_serves_every_output_and_replays_cost_nothing_anywhere(
    make_fleet: MakeEngines, peer: PersonaPeer, s3_server: S3Server,
    s3_store: StoreLocation,
) -> None:
    engines = await make_fleet(3)
    requests = {"image": image("fleet-image"), "voice": voice("fleet-voice")}
    for kind, request in requests.items():
        await peer.publish(kind, request)
    answers = await peer.answers_for([r["request_id"] for r in requests.values()], timeout=60)
    urls = {kind: answers[r["request_id"]].event["url"] for kind, r in requests.items()}
    assert all(answers[r["request_id"]].kind == "completed" for r in requests.values())

    prefix = s3_store.url.split("/", 3)[3]
    for url in urls.values():
        stored = s3_server.object(f"{prefix}{url}")  # url: /outputs/{file}
        assert stored
        for engine in engines:  # whichever instance made it, every one serves it
            response = await fetch(engine, url)
            assert response.status_code == 200 and response.content == stored
            ranged = await fetch(engine, url, Range="bytes=10-99")
            assert ranged.status_code == 206 and ranged.content == stored[10:100]
            assert ranged.headers["Content-Range"] == f"bytes 10-99/{len(stored)}"
        missing = await fetch(engines[0], "/outputs/00000000-0000-4000-8000-000000000000.png")
        assert missing.status_code == 404

    # the instances that did the work go away: their partitions move to the others
    makers = [e for e in engines if outputs_on_disk(e)]
    survivors = [e for e in engines if e not in makers]
    assert survivors  # two requests: at most two makers of three
    for engine in makers:
        await engine.stop()
    await settled(survivors)
    before = {id(e): outputs_on_disk(e) for e in survivors}
    for kind, request in requests.items():  # an operator replays the topic
        await peer.publish(kind, request)
    replays = await peer.wait_for(
        lambda a: a.kind == "completed" and a.event["request_id"] in
        {r["request_id"] for r in requests.values()}, count=4, timeout=60)
    again = {a.event["kind"]: a.event["url"] for a in replays[2:]}
    assert again == urls  # the same URLs ...
    assert sum(gpu_runs(e) for e in survivors) == 0  # ... no GPU work ...
    assert {id(e): outputs_on_disk(e) for e in survivors} == before  # ... and no new file


async def test_presigned_urls_fetch_straight_from_the_store(
    make_fleet: MakeEngines, peer: PersonaPeer,
) -> None:
    engines = await make_fleet(2, output_urls="presigned", output_url_ttl_seconds=120)
    request = image("fleet-presigned")
    await peer.publish("image", request)
    answer = (await peer.answers_for([request["request_id"]], timeout=60))[
        request["request_id"]]
    url = answer.event["url"]
    assert "X-Amz-Signature=" in url and "X-Amz-Expires=120" in url
    async with httpx.AsyncClient() as client:
        direct = await client.get(url)
    assert direct.status_code == 200 and direct.content.startswith(b"\x89PNG")
    for engine in engines:  # the engine's own path still serves it, on every instance
        served = await fetch(engine, f"/outputs/{answer.event['filename']}")
        assert served.content == direct.content


def partition_of(key: str, partitions: int = 3) -> int:
    """The partition a producer's default partitioner gives ``key``."""
    return int(DefaultPartitioner()(key.encode(), list(range(partitions)),
                                    list(range(partitions))))


def owner_of(engines: list[Engine], topic: str, key: str) -> Engine:
    return next(e for e in engines if (topic, partition_of(key)) in e.health.assigned)


def owned_by(engine: Engine, topic: str, partitions: int = 3) -> str:
    """A conversation id whose records of ``topic`` land on a partition ``engine`` owns."""
    for n in range(1000):
        conversation = f"fleet-conversation-{n}"
        if (topic, partition_of(conversation, partitions)) in engine.health.assigned:
            return conversation
    raise AssertionError(f"no conversation lands on {engine.health.assigned}")


async def test_a_lora_trained_on_one_instance_is_used_by_another_at_once(
    make_fleet: MakeEngines, peer: PersonaPeer, settings: Settings, s3_store: StoreLocation,
) -> None:
    engines = await make_fleet(
        2, lora_train_steps=20, lora_resolution=64, lora_learning_rate=1e-3,
        lora_checkpoint_every=10, default_inference_steps=4, flux_max_sequence_length=32)
    training = lora_request()
    await peer.publish("lora", training, key="mia")
    done = (await peer.answers_for([training["request_id"]], timeout=120))[
        training["request_id"]]
    assert done.kind == "completed" and done.event["lora_id"] == "mia_v1", done.event
    assert done.event["lora_location"] == f"{s3_store.url}/loras/mia_v1.json"  # where it is
    trainer = next(e for e in engines if (e.store.directory.parent / "loras" /
                                          "mia_v1.safetensors").exists())
    other = next(e for e in engines if e is not trainer)
    assert not (other.store.directory.parent / "loras" / "mia_v1.safetensors").exists()

    use = image("") | {"conversation_id": owned_by(
        other, settings.topic("generation.requested.image")), "character_lora_id": "mia_v1",
        "prompt": "in a park"}
    await peer.publish("image", use)
    used = (await peer.answers_for([use["request_id"]], timeout=60))[use["request_id"]]
    assert used.kind == "completed" and used.event["prompt"] == "zqx, in a park", used.event
    assert gpu_runs(other) == 1  # the other instance made it, with the fetched LoRA
    assert (other.store.directory.parent / "loras" / "mia_v1.json").exists()


@pytest.fixture
async def counted_photos() -> AsyncIterator[tuple[str, dict[int, int]]]:
    """A local photo server that counts each photo's fetches: (base URL, counts)."""
    images, counts = photos(5), dict.fromkeys(range(5), 0)

    async def photo(request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        counts[n] += 1
        return web.Response(body=images[n], content_type="application/octet-stream")

    app = web.Application()
    app.router.add_get("/photo/{n}", photo)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("")).rstrip("/"), counts
    await server.close()


_TRAINING = {"lora_train_steps": 200, "lora_resolution": 64, "lora_learning_rate": 1e-3,
             "lora_checkpoint_every": 20, "progress_interval": 0.05,
             "default_inference_steps": 4, "flux_max_sequence_length": 32,
             "lora_fetch_allowed_hosts": "127.0.0.1"}


@pytest.mark.slow
async def test_a_training_whose_instance_is_killed_resumes_on_another_from_its_checkpoint(
    make_fleet: MakeEngines, peer: PersonaPeer, settings: Settings, tmp_path: Path,
    dev_model_dir: Path, s3_store: StoreLocation,
    counted_photos: tuple[str, dict[int, int]],
) -> None:
    base, fetches = counted_photos
    own = tmp_path / "killed"
    first = EngineProcess({
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers or "",
        **security_env(settings.kafka_bootstrap_servers or ""),
        "KAFKA_TOPIC_PREFIX": settings.kafka_topic_prefix,
        "KAFKA_GROUP_ID": settings.kafka_group_id, "KAFKA_SESSION_TIMEOUT_MS": "2000",
        "KAFKA_HEARTBEAT_INTERVAL_MS": "200", "KAFKA_FETCH_MAX_WAIT_MS": "10",
        "SERVICE_PORT": "0", "VOICE_BACKEND": "local", "LOG_LEVEL": "INFO",
        "FLUX_MODEL_PATH": str(dev_model_dir), "OUTPUT_DIR": str(own / "outputs"),
        "LORA_OUTPUT_DIR": str(own / "loras"), "TEMP_DIR": str(own / "temp"),
        "STORAGE_URL": s3_store.url, "STORAGE_ENDPOINT_URL": s3_store.endpoint,
        **{name.upper(): str(value) for name, value in _TRAINING.items()},
    }, tmp_path, "killed")
    try:
        await first.start(timeout=60)
        training = lora_request(image_urls=[f"{base}/photo/{n}" for n in range(5)],
                                images=[])
        await peer.publish("lora", training, key="mia")
        await peer.wait_for(lambda a: a.kind == "progress" and a.event["request_id"] ==
                            training["request_id"] and a.event["step"] > 45, timeout=60)
        first.send_signal(signal.SIGKILL)  # a crash: no stop, no checkpoint now
        await first.wait()
        killed = time.perf_counter()  # the peer's clock: nothing of the killed one after
    finally:
        await first.stop()
    assert fetches == dict.fromkeys(range(5), 1)

    # they take the killed one's partitions over (the first one to join may resume the
    # training before the second joins; it then moves on at that rebalance, from the store)
    engines = await make_fleet(2, **_TRAINING)

    def resumed_progress(answer: Any) -> bool:
        return answer.kind == "progress" and answer.event["request_id"] == \
            training["request_id"] and answer.received_at > killed

    first_step = (await peer.wait_for(resumed_progress, timeout=60))[0].event["step"]
    resumed_from = first_step - 1  # the killed instance's last checkpoint, not step 0
    assert resumed_from >= 40 and resumed_from % 20 == 0, first_step
    trainer = owner_of(engines, settings.topic("generation.requested.lora"), "mia")
    onlooker = next(e for e in engines if e is not trainer)
    assert onlooker.addresses is not None
    await peer.wait_for(resumed_progress, count=3, timeout=60)  # running on the trainer
    async with httpx.AsyncClient(base_url=onlooker.addresses.http_url) as client:
        seen = (await client.get(f"/train-lora/{training_id_of(training)}")).json()
    # the onlooker answers the live state the trainer wrote to the store
    assert seen["state"] in ("training", "completed"), seen
    assert seen["state"] == "completed" or seen["step"] >= resumed_from, seen

    done = (await peer.answers_for([training["request_id"]], timeout=120))[
        training["request_id"]]
    assert done.kind == "completed" and done.event["lora_id"] == "mia_v1", done.event
    assert fetches == dict.fromkeys(range(5), 1)  # the photos came from the store
    objects = build_object_store(settings.model_copy(update={
        "storage_url": s3_store.url, "storage_endpoint_url": s3_store.endpoint}))
    assert objects is not None
    assert SharedLoras(objects).versions("mia") == [1]  # registered once
    assert not [k for k in objects.keys(f"trainings/{done.event['training_id']}/")
                if not k.endswith("status.json")]  # inputs and checkpoints cleared


def training_id_of(request: dict[str, Any]) -> str:
    return spec_identity(LoraTrainingRequested.model_validate(request))


async def test_an_http_training_retried_on_another_instance_is_not_trained_twice(
    make_fleet: MakeEngines, tmp_path: Path,
) -> None:
    first, other = await make_fleet(2, **_TRAINING)
    request_id = str(uuid.uuid4())  # the client's idempotency key, sent again on retry
    answers = []
    for engine in (first, other):  # the retry reaches another instance
        assert engine.addresses is not None
        async with httpx.AsyncClient(base_url=engine.addresses.http_url) as client:
            response = await client.post("/train-lora", files=[
                ("images", (f"{n}.png", data, "image/png"))
                for n, data in enumerate(photos(5))], data={
                "character_id": "mia", "trigger_word": "zqx", "request_id": request_id,
                "steps": "400"})
        assert response.status_code == 200, response.text
        answers.append(response.json())
    assert answers[0]["training_id"] == answers[1]["training_id"]
    assert answers[1]["status"] == "training_started"  # the first one's, from the store
    training_folders = [p for p in (tmp_path / "instance-1" / "temp").rglob("spec.json")]
    assert not training_folders  # nothing taken in on the other instance
    assert first.training is not None
    done = await first.training.wait(answers[0]["training_id"])
    assert done is not None and done.state == "completed" and done.lora_id == "mia_v1"


async def test_nothing_is_lost_and_each_conversation_keeps_its_order_across_the_fleet(
    make_fleet: MakeEngines, peer: PersonaPeer,
) -> None:
    engines = await make_fleet(3)
    conversations = [f"fleet-order-{n}" for n in range(6)]
    requests = [voice(conversations[n % 6]) | {"text": f"Line number {n}."}
                for n in range(48)]
    for request in requests[:24]:
        await peer.publish("voice", request)
    await peer.answers_for([r["request_id"] for r in requests[:8]], timeout=60)
    await engines[0].stop()  # an instance goes away mid-stream: its partitions move
    for request in requests[24:]:
        await peer.publish("voice", request)
    answers = await peer.answers_for([r["request_id"] for r in requests], timeout=120)
    assert all(a.kind == "completed" for a in answers.values())  # nothing lost
    for conversation in conversations:  # first answers in the order of the requests
        mine = [r["request_id"] for r in requests if r["conversation_id"] == conversation]
        firsts = sorted(mine, key=lambda rid: (answers[rid].partition, answers[rid].offset))
        assert firsts == mine, conversation
