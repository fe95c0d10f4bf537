"""STEP_CACHE in a running engine: shown in /health, images of the requested size, and a
replay after cleanup regenerates the very same pixels (the cache's state never leaks from
one call into the next)."""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from PIL import Image

from consumers.engine import Engine
from core.settings import Settings
from tests.support.dev_engine import dev_engine
from tests.support.kafka_client import Answer, PersonaPeer

pytestmark = pytest.mark.kafka


@pytest.fixture
async def engine(settings: Settings, dev_model_dir: Path, tmp_path: Path
                 ) -> AsyncIterator[Engine]:
    async with dev_engine(settings, dev_model_dir, tmp_path, step_cache="taylorseer",
                          step_cache_interval=3) as running:
        yield running


async def get(engine: Engine, path: str) -> tuple[int, bytes]:
    assert engine.addresses is not None
    async with aiohttp.ClientSession() as session, \
            session.get(engine.addresses.http_url + path) as response:
        return response.status, await response.read()


async def completed(peer: PersonaPeer, request: dict[str, object]) -> dict[str, object]:
    def mine(a: Answer) -> bool:
        return a.kind in ("completed", "failed") and \
            a.event.get("request_id") == request["request_id"]

    before = sum(1 for a in peer.answers if mine(a))
    await peer.publish("image", request)
    done = (await peer.wait_for(mine, count=before + 1, timeout=60))[-1]
    assert done.kind == "completed", repr(done.event)[:2000]
    return done.event


async def test_health_shows_the_cache_and_a_replay_regenerates_the_same_pixels(
    engine: Engine, peer: PersonaPeer
) -> None:
    status, body = await get(engine, "/health")
    image_model = json.loads(body)["image_model"]
    assert image_model["acceleration"] == {
        "quantization": "none", "step_cache": "taylorseer", "step_cache_interval": 3,
        "compiled": False, "fused_qkv": False, "attention_backend": "native"}
    request = {"request_id": str(uuid.uuid4()), "conversation_id": "c-cache",
               "prompt": "a portrait of a woman in a cafe", "width": 64, "height": 80,
               "num_inference_steps": 9, "optimize_prompt": False}
    first = await completed(peer, request)
    status, original = await get(engine, str(first["url"]))
    assert status == 200
    assert Image.open(io.BytesIO(original)).size == (64, 80)
    stored = engine.store.resolve(str(first["filename"]))
    assert stored is not None
    stored.unlink()  # cleanup: the replay must generate again
    again = await completed(peer, dict(request))
    assert again["filename"] != first["filename"] and again["seed"] == first["seed"]
    status, regenerated = await get(engine, str(again["url"]))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(original))),
                          np.asarray(Image.open(io.BytesIO(regenerated))))
