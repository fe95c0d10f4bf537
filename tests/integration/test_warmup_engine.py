"""A whole engine with COMPILE_TRANSFORMER=true on the tiny model, through the real broker:
once it says ready, its first requests (at the default size, without a LoRA, with the
development LoRA, and back) compile nothing: the compilation was paid by the warm-up,
before ready. (Readiness answering ``warming`` meanwhile: tests/integration/test_warmup.py.)
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from consumers.engine import Engine
from consumers.serve import DEV_LORA_ID
from core.health import EngineHealth
from core.image.warmup import compiled_graphs
from core.settings import Settings
from tests.support.dev_engine import dev_engine
from tests.support.kafka_client import Answer, PersonaPeer

pytestmark = [
    pytest.mark.kafka,
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:torch"),  # inductor's own imports
]


def serving(health: EngineHealth) -> bool:
    return health.started and health.kafka_connected and bool(health.assigned)


async def ready(engine: Engine) -> tuple[int, dict[str, Any]]:
    assert engine.addresses is not None
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(engine.addresses.http_url + "/health/ready")
    return response.status_code, response.json()


async def answer(peer: PersonaPeer, **fields: Any) -> Answer:
    request = {"request_id": str(uuid.uuid4()), "conversation_id": "c-warm",
               "prompt": "a lighthouse on a cliff", "num_inference_steps": 2,
               "optimize_prompt": False, **fields}  # no size: the default one

    def mine(a: Answer) -> bool:
        return a.kind in ("completed", "failed") and \
            a.event.get("request_id") == request["request_id"]

    await peer.publish("image", request)
    return (await peer.wait_for(mine, timeout=240))[-1]


async def test_a_compiled_engine_serves_its_first_requests_without_compiling(
    settings: Settings, dev_model_dir: Path, tmp_path: Path, peer: PersonaPeer
) -> None:
    async with dev_engine(settings, dev_model_dir, tmp_path, compile_transformer=True,
                          progress_interval=0.0) as engine:
        assert engine.image is not None
        assert engine.health.image_model.acceleration is not None
        assert engine.health.image_model.acceleration["compiled"] is True
        await engine.health.wait_until(serving, timeout=60)
        assert await ready(engine) == (200, {"status": "ready", "reasons": []})
        graphs = compiled_graphs()
        with torch.compiler.set_stance("fail_on_recompile"):
            answers = [await answer(peer, seed=1),
                       await answer(peer, seed=1, character_lora_id=DEV_LORA_ID),
                       await answer(peer, seed=2)]
        assert [a.kind for a in answers] == ["completed"] * 3, [a.event for a in answers]
        assert {(a.event["width"], a.event["height"]) for a in answers} == {(1024, 1024)}
        assert compiled_graphs() == graphs
