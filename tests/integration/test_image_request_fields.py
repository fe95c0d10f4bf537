"""The image request's newer fields end to end, through the real broker and the HTTP app on
the tiny model: every bad value refused naming its field (``INVALID_REQUEST`` /
``UNKNOWN_LORA`` on Kafka, 422 on HTTP), several images in one completed event, WebP and
JPEG files served with their content type, image-to-image from a URL on a local server and
from an inline image."""

from __future__ import annotations

import base64
import io
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from PIL import Image

from consumers.engine import Engine
from consumers.serve import DEV_LORA_ID
from core.settings import Settings
from tests.core.test_image_requests import InitServer, gradient, png_bytes
from tests.support.dev_engine import dev_engine
from tests.support.kafka_client import Answer, PersonaPeer

pytestmark = pytest.mark.kafka

# a bad value of each new field (the contract's ranges, then the engine's rules), and the
# field its error names
BAD: list[tuple[dict[str, Any], str]] = [
    ({"lora_scale": 2.5}, "lora_scale"),
    ({"loras": [{"lora_id": "x", "scale": -1}]}, "loras.0.scale"),
    ({"num_images": 5}, "num_images"),
    ({"output_format": "gif"}, "output_format"),
    ({"output_quality": 0}, "output_quality"),
    ({"init_image": "%%%"}, "init_image"),
    ({"strength": 1.5}, "strength"),
    ({"init_image_url": "ftp://images.example/a.png"}, "init_image_url"),
    ({"loras": [{"lora_id": "a"}, {"lora_id": "b"}, {"lora_id": "c"}],
      "character_lora_id": DEV_LORA_ID}, "loras"),
    ({"init_image": base64.b64encode(b"not an image").decode()}, "init_image"),
]


@pytest.fixture
async def engine(settings: Settings, dev_model_dir: Path, tmp_path: Path
                 ) -> AsyncIterator[Engine]:
    async with dev_engine(settings, dev_model_dir, tmp_path, persona_engine_url=None,
                          batch_window_ms=0, progress_interval=0.0,
                          lora_fetch_allowed_hosts="127.0.0.1",
                          flux_max_sequence_length=32) as instance:
        yield instance


def image_request(**fields: Any) -> dict[str, Any]:
    return {"request_id": str(uuid.uuid4()), "conversation_id": f"c-{uuid.uuid4().hex[:6]}",
            "prompt": "a portrait in a cafe", "width": 64, "height": 64,
            "num_inference_steps": 3, "optimize_prompt": False, "seed": 5, **fields}


async def answers(peer: PersonaPeer, requests: list[dict[str, Any]], **publish: Any
                  ) -> list[Answer]:
    for request in requests:
        await peer.publish("image", request, **publish)
    found = await peer.answers_for([r["request_id"] for r in requests], timeout=60)
    return [found[r["request_id"]] for r in requests]


async def fetch(engine: Engine, url: str) -> tuple[str, bytes]:
    assert engine.addresses is not None
    async with aiohttp.ClientSession() as session, \
            session.get(engine.addresses.http_url + url) as response:
        assert response.status == 200
        return response.headers["Content-Type"], await response.read()


async def post(engine: Engine, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    assert engine.addresses is not None
    async with aiohttp.ClientSession() as session, session.post(
            engine.addresses.http_url + "/generate/image", json=body) as response:
        return response.status, await response.json()


async def test_every_new_field_is_checked_on_kafka_and_on_http(
    engine: Engine, peer: PersonaPeer
) -> None:
    requests = [image_request(**fields) for fields, _ in BAD]
    unknown = image_request(character_lora_id=DEV_LORA_ID, loras=[{"lora_id": "nobody_v9"}])
    failed = await answers(peer, [*requests, unknown], encoding="json")
    for (_, field), answer in zip(BAD, failed, strict=False):
        assert answer.kind == "failed", answer.event
        assert answer.event["error_code"] == "INVALID_REQUEST", answer.event
        assert field in answer.event["message"] and answer.event["retryable"] is False
    assert failed[-1].event["error_code"] == "UNKNOWN_LORA"
    assert "nobody_v9" in failed[-1].event["message"]
    for fields, field in BAD:
        status, body = await post(engine, image_request(**fields))
        assert status == 422, (fields, body)
        assert ["body", *field.split(".")] in [d["loc"] for d in body["detail"]], body
    status, body = await post(engine, unknown)
    assert status == 422 and body["error_code"] == "UNKNOWN_LORA"
    assert body["detail"][0]["loc"] == ["body", "loras", "0", "lora_id"]
    histogram = engine.metrics.registry.get_sample_value
    assert not histogram("engine_image_batch_size_count")  # nothing reached the GPU


async def test_several_images_and_lossy_formats_over_kafka_and_http(
    engine: Engine, peer: PersonaPeer
) -> None:
    request = image_request(num_images=3, output_format="webp", output_quality=60, seed=11)
    (done,) = await answers(peer, [request], encoding="avro")
    event = done.event
    assert done.kind == "completed", event
    assert [image["seed"] for image in event["images"]] == [11, 12, 13]
    assert event["filename"] == event["images"][0]["filename"] and event["seed"] == 11
    histogram = engine.metrics.registry.get_sample_value
    assert (histogram("engine_image_batch_size_count"),
            histogram("engine_image_batch_size_sum")) == (1, 3)
    for image in event["images"]:
        assert image["filename"].endswith(".webp")
        kind, data = await fetch(engine, image["url"])
        assert kind == "image/webp" and data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    status, result = await post(engine, image_request(output_format="jpeg", num_images=2))
    assert status == 200 and len(result["images"]) == 2, result
    kind, data = await fetch(engine, result["url"])
    assert kind == "image/jpeg" and data[:3] == b"\xff\xd8\xff"
    status, plain = await post(engine, image_request())
    assert status == 200 and "images" not in plain and plain["filename"].endswith(".png")
    kind, data = await fetch(engine, plain["url"])
    assert kind == "image/png" and data[:4] == b"\x89PNG"


async def test_image_to_image_from_a_url_on_kafka_and_inline_on_http(
    engine: Engine, peer: PersonaPeer
) -> None:
    init = png_bytes(gradient(100, 70))
    server = InitServer(init)
    await server.start()
    try:
        request = image_request(init_image_url=server.url, width=None, height=None,
                                strength=0.6)
        (done,) = await answers(peer, [request])
    finally:
        await server.stop()
    assert done.kind == "completed", done.event
    assert (done.event["width"], done.event["height"]) == (96, 64) and server.hits == 1
    status, result = await post(engine, image_request(
        init_image=base64.b64encode(init).decode(), strength=0.6, width=None, height=None))
    assert status == 200, result
    assert result["filename"] == done.event["filename"]  # same bytes: the result cache
    _, data = await fetch(engine, result["url"])
    with Image.open(io.BytesIO(data)) as image:
        assert image.size == (96, 64)
        assert np.asarray(image).std() > 0
