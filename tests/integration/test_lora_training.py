"""LoRA training end to end on the tiny model through the real broker and the HTTP API:
a completed event of kind lora whose LoRA works at once, images served between chunks,
bad uploads refused with nothing written, and a SIGKILLed engine resuming from its
checkpoint."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from consumers.engine import Engine
from consumers.serve import prepare_dev_model
from core.settings import Settings
from tests.core.test_training_images import bomb_png, noise_png, photos
from tests.support.engine_process import EngineProcess
from tests.support.kafka_client import Answer, PersonaPeer
from tests.support.kafka_security import security_env

pytestmark = pytest.mark.kafka

WAIT = 60.0
MAX_IMAGE_BYTES = 200_000


def trained(settings: Settings, dev_model_dir: Path, tmp_path: Path) -> Settings:
    return settings.model_copy(update={
        "dev_model_dir": dev_model_dir, "lora_output_dir": tmp_path / "loras",
        "temp_dir": tmp_path / "temp", "lora_train_steps": 60, "lora_resolution": 64,
        "lora_learning_rate": 1e-3, "lora_checkpoint_every": 20, "progress_interval": 0.05,
        "default_inference_steps": 4, "flux_max_sequence_length": 32, "batch_window_ms": 0,
        "lora_max_image_bytes": MAX_IMAGE_BYTES,
        "lora_fetch_allowed_hosts": "127.0.0.1",  # the local image server below
    })


@pytest.fixture
async def make_engine(settings: Settings, dev_model_dir: Path, tmp_path: Path
                      ) -> AsyncIterator[Callable[..., Awaitable[Engine]]]:
    started: list[Engine] = []

    async def make(**overrides: Any) -> Engine:
        configured = trained(settings, dev_model_dir, tmp_path).model_copy(update=overrides)
        model_path = await asyncio.to_thread(prepare_dev_model, configured)  # + sarah_v1
        assert configured.kafka_bootstrap_servers is not None
        instance = Engine(configured, configured.kafka_bootstrap_servers,
                          model_path=model_path, http_host="127.0.0.1",
                          registry=CollectorRegistry())
        await instance.start()
        started.append(instance)
        return instance

    yield make
    for instance in started:
        await instance.stop()


@pytest.fixture
async def engine(make_engine: Callable[..., Awaitable[Engine]]) -> Engine:
    return await make_engine()


@pytest.fixture
async def pictures() -> AsyncIterator[str]:
    """A local image server: /photo/{n}, /big (over the byte limit), /missing (404)."""
    images = photos(5)

    async def photo(request: web.Request) -> web.Response:
        return web.Response(body=images[int(request.match_info["n"])],
                            content_type="application/octet-stream")

    async def big(_: web.Request) -> web.Response:
        return web.Response(body=noise_png(300), content_type="image/png")

    app = web.Application()
    app.router.add_get("/photo/{n}", photo)
    app.router.add_get("/big", big)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("")).rstrip("/")
    await server.close()


def lora_request(**fields: Any) -> dict[str, Any]:
    inline = [{"filename": f"{i}.png", "data": base64.b64encode(d).decode()}
              for i, d in enumerate(photos(5))]
    return {"request_id": str(uuid.uuid4()), "conversation_id": f"c-{uuid.uuid4().hex[:6]}",
            "character_id": "mia", "trigger_word": "zqx", "images": inline, **fields}


def image_request(**fields: Any) -> dict[str, Any]:
    return {"request_id": str(uuid.uuid4()), "conversation_id": f"c-{uuid.uuid4().hex[:6]}",
            "prompt": "in a park", "width": 64, "height": 64, "num_inference_steps": 4,
            "optimize_prompt": False, **fields}


def of(request: dict[str, Any], kind: str | None = None) -> Callable[[Answer], bool]:
    def match(answer: Answer) -> bool:
        return (answer.event.get("request_id") == request["request_id"]
                and (answer.kind == kind if kind is not None
                     else answer.kind in ("completed", "failed")))
    return match


def written(*folders: Path) -> set[str]:
    return {str(p) for folder in folders if folder.exists() for p in folder.rglob("*")}


async def test_kafka_training_gives_a_lora_usable_at_once_and_images_run_meanwhile(
    engine: Engine, peer: PersonaPeer, pictures: str
) -> None:
    urls = [f"{pictures}/photo/{n}" for n in range(3)]
    training = lora_request(steps=150, image_urls=urls,
                            images=lora_request()["images"][3:])
    await peer.publish("lora", training, key="mia", encoding="avro")
    await peer.wait_for(of(training, "progress"), timeout=WAIT)
    image = image_request()
    await peer.publish("image", image)
    answers = await peer.answers_for([training["request_id"], image["request_id"]],
                                     timeout=WAIT)
    done, picture = answers[training["request_id"]], answers[image["request_id"]]
    assert done.kind == "completed" and picture.kind == "completed", done.event
    assert picture.received_at < done.received_at, "the image waited for the training"

    event = done.event
    assert event["kind"] == "lora" and event["character_id"] == "mia"
    assert event["trigger_word"] == "zqx" and event["lora_id"] == "mia_v1"
    assert event["training_id"].startswith("mia_") and event["development_model"] is True
    progress = [a.event for a in peer.answers if of(training, "progress")(a)]
    assert [p["step"] for p in progress] == sorted(p["step"] for p in progress)
    assert progress[-1]["step"] == 150 and all(p["kind"] == "lora" for p in progress)
    assert all(isinstance(p["loss"], float) for p in progress)

    use = image_request(character_lora_id="mia_v1")
    await peer.publish("image", use)
    used = await peer.wait_for(of(use), timeout=WAIT)
    assert used[0].kind == "completed" and used[0].event["prompt"] == "zqx, in a park"

    assert engine.addresses is not None
    async with aiohttp.ClientSession(engine.addresses.http_url) as session:
        async with session.get(f"/train-lora/{event['training_id']}") as response:
            status = await response.json()
        assert status["state"] == "completed" and status["lora_id"] == "mia_v1"
        async with session.get(status["validation_image_url"]) as response:
            assert response.status == 200 and response.content_type == "image/png"
        async with session.get("/train-lora/nobody_12345678") as response:
            assert response.status == 404
        for trick in ("..%2f..%2fetc", "%2e%2e", "..", ".hidden"):
            async with session.get(f"/train-lora/{trick}") as response:
                assert response.status == 404, trick
    await peer.publish("lora", training, key="mia")  # redelivered or replayed
    replay = await peer.wait_for(of(training), count=2, timeout=WAIT)
    assert replay[-1].event["lora_id"] == "mia_v1"  # answered from the registry


async def test_kafka_bad_requests_fail_as_invalid_naming_the_image_and_write_nothing(
    engine: Engine, peer: PersonaPeer, pictures: str, tmp_path: Path
) -> None:
    before = written(tmp_path / "temp", tmp_path / "loras")
    good = lora_request()["images"]
    text = {"filename": "photo.png", "data": base64.b64encode(b"hello, not an image").decode()}
    bomb = {"filename": "bomb.png", "data": base64.b64encode(bomb_png()).decode()}
    huge = {"filename": "huge.png", "data": base64.b64encode(noise_png(300)).decode()}
    cases = [
        (lora_request(images=good[:4]), "images", "at least 5"),
        (lora_request(images=[*good[:2], text, *good[2:]]), "images.2", "not a PNG, JPEG"),
        (lora_request(images=[*good[:3], bomb, *good[3:]]), "images.3", "decompression bomb"),
        (lora_request(images=[good[0], huge, *good[1:]]), "images.1", "LORA_MAX_IMAGE_BYTES"),
        (lora_request(image_urls=[f"{pictures}/missing"]), "image_urls.0", "HTTP 404"),
        (lora_request(image_urls=[f"{pictures}/big"]), "image_urls.0", "LORA_MAX_IMAGE_BYTES"),
        (lora_request(image_urls=["file:///etc/passwd"]), "image_urls.0", "only http"),
        (lora_request(trigger_word="<lora:x>"), "trigger_word", "trigger_word"),
        (lora_request(character_id="../etc"), "character_id", "character_id"),
    ]
    for request, _, _ in cases:
        await peer.publish("lora", request, key="mia")
    answers = await peer.answers_for([r["request_id"] for r, _, _ in cases], timeout=WAIT)
    for request, field, reason in cases:
        failed = answers[request["request_id"]]
        assert failed.kind == "failed", (field, failed.event)
        assert failed.event["error_code"] == "INVALID_REQUEST" and not failed.event["retryable"]
        assert failed.event["message"].startswith(field) or field in failed.event["message"]
        assert reason in failed.event["message"], failed.event["message"]
    assert written(tmp_path / "temp", tmp_path / "loras") == before


async def test_a_training_only_instance_consumes_only_lora_requests(
    make_engine: Callable[..., Awaitable[Engine]], peer: PersonaPeer, settings: Settings
) -> None:
    engine = await make_engine(lora_training_only=True)
    refused = lora_request(images=lora_request()["images"][:4])
    await peer.publish("lora", refused, key="mia")
    answer = (await peer.wait_for(of(refused), timeout=WAIT))[0]
    assert answer.kind == "failed" and answer.event["error_code"] == "INVALID_REQUEST"
    topics = {topic for topic, _ in engine.health.assigned}
    assert topics == {settings.topic("generation.requested.lora")}


def form(images: list[tuple[str, bytes]], **fields: str) -> aiohttp.FormData:
    data = aiohttp.FormData()
    for name, value in {"character_id": "mia", "trigger_word": "zqx", **fields}.items():
        data.add_field(name, value)
    for filename, content in images:
        data.add_field("images", content, filename=filename, content_type="image/png")
    return data


async def test_http_train_lora_answers_like_the_original_api_and_trains(engine: Engine
                                                                         ) -> None:
    assert engine.addresses is not None and engine.training is not None
    files = [(f"{i}.png", d) for i, d in enumerate(photos(5))]
    async with aiohttp.ClientSession(engine.addresses.http_url) as session:
        async with session.post("/train-lora", data=form(files, request_id="r-12345")
                                ) as response:
            assert response.status == 200, await response.text()
            body = await response.json()
        assert {"training_id", "status", "character_id", "trigger_word",
                "estimated_time_minutes", "timestamp"} <= set(body)
        assert body["status"] == "training_started" and body["character_id"] == "mia"
        assert body["training_id"] == "mia_" + hashlib.sha256(b"r-12345").hexdigest()[:8]
        assert isinstance(body["estimated_time_minutes"], int)
        assert body["estimated_time_minutes"] >= 1
        done = await asyncio.wait_for(engine.training.wait(body["training_id"]), WAIT)
        assert done is not None and done.state == "completed", done
        async with session.get(f"/train-lora/{body['training_id']}") as response:
            status = await response.json()
        assert status["state"] == "completed" and status["lora_id"] == "mia_v1"
        assert status["step"] == status["total"] == 60
        async with session.post("/train-lora", data=form(files, request_id="r-12345")
                                ) as response:
            again = await response.json()  # the same request: the same, finished training
        assert again["status"] == "completed" and again["lora_id"] == "mia_v1"


async def test_http_bad_uploads_are_422_naming_the_image_and_write_nothing(
    engine: Engine, tmp_path: Path
) -> None:
    assert engine.addresses is not None
    before = written(tmp_path / "temp", tmp_path / "loras")
    good = [(f"{i}.png", d) for i, d in enumerate(photos(5))]
    many = [(f"{i}.png", good[i % 5][1]) for i in range(51)]
    cases = [
        (form(good[:4]), ["body", "images"], "at least 5"),
        (form(many), ["body", "images"], "at most 50"),
        (form([*good[:3], ("notes.png", b"plain text, named .png"), *good[3:]]),
         ["body", "images", "3"], "not a PNG, JPEG or WebP"),
        (form([("b.png", bomb_png()), *good]), ["body", "images", "0"],
         "decompression bomb"),
        (form([*good, ("huge.png", noise_png(300))]), ["body", "images", "5"],
         "LORA_MAX_IMAGE_BYTES"),
        (form(good, trigger_word=""), ["body", "trigger_word"], "blank"),
        (form(good, steps="many"), ["body", "steps"], "must be a number"),
    ]
    async with aiohttp.ClientSession(engine.addresses.http_url) as session:
        for data, loc, reason in cases:
            async with session.post("/train-lora", data=data) as response:
                body = await response.json()
                assert response.status == 422, body
            assert body["error_code"] == "INVALID_REQUEST"
            assert any(d["loc"] == loc and reason in d["msg"] for d in body["detail"]), body
    assert written(tmp_path / "temp", tmp_path / "loras") == before


@pytest.mark.slow
async def test_a_sigkilled_engine_resumes_the_training_from_its_checkpoint(
    settings: Settings, peer: PersonaPeer, tmp_path: Path, dev_model_dir: Path
) -> None:
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers or "",
        **security_env(settings.kafka_bootstrap_servers or ""),
        "KAFKA_TOPIC_PREFIX": settings.kafka_topic_prefix,
        "KAFKA_GROUP_ID": settings.kafka_group_id, "KAFKA_SESSION_TIMEOUT_MS": "3000",
        "KAFKA_HEARTBEAT_INTERVAL_MS": "300", "KAFKA_FETCH_MAX_WAIT_MS": "10",
        "SERVICE_PORT": "0", "OUTPUT_DIR": str(tmp_path / "outputs"), "VOICE_BACKEND": "local",
        "LOG_LEVEL": "INFO", "FLUX_MODEL_PATH": str(dev_model_dir),
        "LORA_OUTPUT_DIR": str(tmp_path / "loras"), "TEMP_DIR": str(tmp_path / "temp"),
        "LORA_RESOLUTION": "64", "LORA_LEARNING_RATE": "1e-3", "LORA_CHECKPOINT_EVERY": "20",
        "PROGRESS_INTERVAL": "0.05", "DEFAULT_INFERENCE_STEPS": "4",
        "FLUX_MAX_SEQUENCE_LENGTH": "32",
    }
    processes: list[EngineProcess] = []
    try:
        first = EngineProcess(env, tmp_path, "first")
        processes.append(first)
        await first.start(timeout=WAIT)
        training = lora_request(steps=200)
        await peer.publish("lora", training, key="mia")
        await peer.wait_for(lambda a: of(training, "progress")(a) and a.event["step"] > 45,
                            timeout=WAIT)
        first.send_signal(signal.SIGKILL)  # a real crash: no stop, no checkpoint now
        await first.wait()
        restarted = EngineProcess(env, tmp_path, "restarted")
        processes.append(restarted)
        await restarted.start(timeout=WAIT)
        serving_at = time.perf_counter()  # it publishes nothing before it serves
        done = (await peer.wait_for(of(training), timeout=WAIT))[0]
        assert done.kind == "completed" and done.event["lora_id"] == "mia_v1", done.event
        line = await restarted.wait_for_line(lambda text: "resumes from step" in text, 5)
        match = re.search(r"resumes from step (\d+) of 200", line)
        assert match is not None, line
        resumed_from = int(match.group(1))  # the killed engine's last checkpoint
        assert resumed_from >= 40 and resumed_from % 20 == 0
        steps = [a.event["step"] for a in peer.answers
                 if of(training, "progress")(a) and a.received_at > serving_at]
        assert steps[0] == resumed_from + 1 and steps[-1] == 200, steps
    finally:
        for process in processes:
            await process.stop()
