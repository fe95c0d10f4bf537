"""Images end to end on the tiny development model through the real broker: PNGs with
their parameters, replays, LoRAs, validation, batching and progress."""

from __future__ import annotations

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
from tests.support.dev_engine import dev_engine
from tests.support.kafka_client import Answer, PersonaPeer
from tests.support.persona_server import PersonaLLMServer

pytestmark = pytest.mark.kafka


@pytest.fixture
async def llm() -> AsyncIterator[PersonaLLMServer]:
    server = PersonaLLMServer()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def image_engine(settings: Settings, dev_model_dir: Path, tmp_path: Path,
                       llm: PersonaLLMServer) -> AsyncIterator[Engine]:
    async with dev_engine(settings, dev_model_dir, tmp_path, persona_engine_url=llm.url,
                          persona_engine_timeout=0.5, batch_window_ms=300,
                          progress_interval=0.0) as engine:  # + sarah_v1
        yield engine


def image_request(**fields: Any) -> dict[str, Any]:
    return {"request_id": str(uuid.uuid4()), "conversation_id": f"c-{uuid.uuid4().hex[:6]}",
            "prompt": "a portrait of a woman in a cafe", "width": 64, "height": 80,
            "num_inference_steps": 4, "optimize_prompt": False, **fields}


async def answer(peer: PersonaPeer, request: dict[str, Any], **publish: Any) -> Answer:
    """Publishes ``request`` and returns its newest answer (replays reuse request ids)."""
    def mine(a: Answer) -> bool:
        return a.kind in ("completed", "failed") and a.event.get("request_id") == request["request_id"]

    before = sum(1 for a in peer.answers if mine(a))
    await peer.publish("image", request, **publish)
    return (await peer.wait_for(mine, count=before + 1, timeout=60))[-1]


async def png(engine: Engine, url: str) -> Image.Image:
    assert engine.addresses is not None
    async with aiohttp.ClientSession() as session, \
            session.get(engine.addresses.http_url + url) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "image/png"
        image = Image.open(io.BytesIO(await response.read()))
        image.load()
        return image


def pixels(image: Image.Image) -> np.ndarray[Any, Any]:
    return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("encoding", ["json", "avro"])
async def test_image_request_gives_a_png_with_its_parameters(
    image_engine: Engine, peer: PersonaPeer, encoding: str
) -> None:
    done = await answer(peer, image_request(seed=7), encoding=encoding)
    assert done.kind == "completed", done.event
    event = done.event
    assert event["kind"] == "image" and (event["width"], event["height"]) == (64, 80)
    assert event["seed"] == 7 and event["development_model"] is True
    assert event["model"] == "flux-tiny-dev"
    assert event["url"] == f"/outputs/{event['image_id']}.png"
    image = await png(image_engine, event["url"])
    assert image.size == (64, 80)
    text = image.text  # type: ignore[attr-defined]
    assert text["prompt"] == event["prompt"] and text["seed"] == "7"
    assert text["steps"] == "4" and text["model"] == "flux-tiny-dev"
    assert text["development_model"] == "True"


async def test_replays_cost_nothing_twice_and_regenerate_the_same_image(
    image_engine: Engine, peer: PersonaPeer
) -> None:
    request = image_request()  # no seed: derived from request_id
    first = (await answer(peer, request)).event
    replay = (await answer(peer, dict(request))).event
    assert replay["filename"] == first["filename"]  # answered from the result cache
    original = pixels(await png(image_engine, first["url"]))
    assert image_engine.store.resolve(first["filename"]) is not None
    image_engine.store.resolve(first["filename"]).unlink()  # type: ignore[union-attr]
    regenerated = (await answer(peer, dict(request))).event
    assert regenerated["filename"] != first["filename"]
    assert regenerated["seed"] == first["seed"] and regenerated["prompt"] == first["prompt"]
    assert np.array_equal(pixels(await png(image_engine, regenerated["url"])), original)
    other = (await answer(peer, image_request())).event
    assert not np.array_equal(pixels(await png(image_engine, other["url"])), original)


async def test_lora_changes_the_image_and_no_lora_restores_the_base_exactly(
    image_engine: Engine, peer: PersonaPeer
) -> None:
    prompt = "sarah smiling in a park"  # already holds the trigger word: same prompt
    base = (await answer(peer, image_request(prompt=prompt, seed=3))).event
    with_lora = (await answer(peer, image_request(prompt=prompt, seed=3,
                                                  character_lora_id=DEV_LORA_ID))).event
    again = (await answer(peer, image_request(prompt=prompt, seed=3, width=64, height=80,
                                              num_inference_steps=4, guidance_scale=3.5))).event
    assert with_lora["prompt"] == base["prompt"] == prompt
    assert with_lora["lora_id"] == DEV_LORA_ID and base["lora_id"] is None
    base_pixels = pixels(await png(image_engine, base["url"]))
    assert not np.array_equal(pixels(await png(image_engine, with_lora["url"])), base_pixels)
    # `again` is the same content as `base`: answered from cache unless recomputed; force
    # a recompute by removing the file first
    image_engine.store.resolve(again["filename"]).unlink()  # type: ignore[union-attr]
    recomputed = (await answer(peer, image_request(prompt=prompt, seed=3))).event
    assert np.array_equal(pixels(await png(image_engine, recomputed["url"])), base_pixels)


async def test_trigger_word_is_added_and_kept_when_the_llm_drops_it(
    image_engine: Engine, peer: PersonaPeer, llm: PersonaLLMServer
) -> None:
    llm.reply = lambda messages: "a woman reading in a sunny cafe, cinematic"
    event = (await answer(peer, image_request(character_lora_id=DEV_LORA_ID,
                                              optimize_prompt=True))).event
    assert event["prompt"].startswith("sarah, ")
    assert llm.received  # the LLM was asked, its answer refused
    plain = (await answer(peer, image_request(prompt="a cafe", character_lora_id=DEV_LORA_ID)
                          )).event
    assert plain["prompt"] == "sarah, a cafe"  # optimize_prompt false: as given + trigger


@pytest.mark.parametrize(
    ("fields", "code", "named"),
    [
        ({"width": 100}, "INVALID_REQUEST", "width"),
        ({"height": 4096}, "INVALID_REQUEST", "height"),
        ({"num_inference_steps": 0}, "INVALID_REQUEST", "num_inference_steps"),
        ({"character_lora_id": "nobody_v9"}, "UNKNOWN_LORA", "nobody_v9"),
    ],
)
async def test_bad_requests_fail_fast_naming_the_problem(
    image_engine: Engine, peer: PersonaPeer, fields: dict[str, Any], code: str, named: str
) -> None:
    failed = await answer(peer, image_request(**fields))
    assert failed.kind == "failed"
    assert failed.event["error_code"] == code and named in failed.event["message"]
    assert failed.event["retryable"] is False


async def test_compatible_requests_are_batched(image_engine: Engine, peer: PersonaPeer) -> None:
    requests = [image_request(seed=i) for i in range(4)]  # 4 conversations, same shape
    for r in requests:
        await peer.publish("image", r)
    answers = await peer.answers_for([r["request_id"] for r in requests], timeout=60)
    assert all(a.kind == "completed" for a in answers.values())
    histogram = image_engine.metrics.registry.get_sample_value
    batches = histogram("engine_image_batch_size_count")
    images = histogram("engine_image_batch_size_sum")
    assert images == 4 and batches is not None and batches < 4  # ran together, not 1 by 1


async def test_progress_events_arrive_in_order_before_completion(
    image_engine: Engine, peer: PersonaPeer
) -> None:
    request = image_request(num_inference_steps=5)
    done = await answer(peer, request)
    progress = [a for a in peer.answers
                if a.kind == "progress" and a.event["request_id"] == request["request_id"]]
    steps = [a.event["step"] for a in progress]
    assert steps == sorted(steps) and steps[-1] == 5
    assert all(a.event["total"] == 5 and a.event["kind"] == "image" for a in progress)
    assert all(a.received_at <= done.received_at for a in progress)


async def test_http_generate_image_uses_the_same_core(image_engine: Engine) -> None:
    assert image_engine.addresses is not None
    body = {"prompt": "A beautiful sunset over mountains", "character_lora_id": DEV_LORA_ID,
            "width": 64, "height": 64, "num_inference_steps": 3, "guidance_scale": 7.5,
            "seed": 42}
    async with aiohttp.ClientSession() as session:
        async with session.post(image_engine.addresses.http_url + "/generate/image",
                                json=body) as response:
            assert response.status == 200
            result = await response.json()
        async with session.post(image_engine.addresses.http_url + "/generate/image",
                                json={**body, "width": 65}) as response:
            assert response.status == 422
            assert ["body", "width"] in [d["loc"] for d in (await response.json())["detail"]]
    assert {"image_id", "filename", "prompt", "width", "height", "url", "timestamp"} <= set(result)
    assert "sarah" in result["prompt"] and result["seed"] == 42
    assert (await png(image_engine, result["url"])).size == (64, 64)
