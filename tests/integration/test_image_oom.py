"""An image that cannot fit, through the real engine (broker, consume loop, ImageService,
GPU worker on the tiny development model), torch's out of memory injected at the worker's
test seam: two GPU attempts in all, then ``OUT_OF_MEMORY``; no tensor of the failed calls
outlives the answer; the next request runs normally."""

from __future__ import annotations

import functools
import gc
import uuid
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch

import core.image.factory
from core.image import GpuWorker, ImageJob
from core.settings import Settings
from tests.support.dev_engine import dev_engine
from tests.support.kafka_client import PersonaPeer

pytestmark = pytest.mark.kafka


class NeverFits:
    """The worker's ``oom_injector``: a call with a "huge" prompt allocates a tensor (held
    only by its frame, like a failed call's activations), then runs out of memory."""

    def __init__(self) -> None:
        self.attempts = 0
        self.tensors: list[weakref.ref[torch.Tensor]] = []

    def __call__(self, jobs: list[ImageJob]) -> None:
        if not any("huge" in job.prompt for job in jobs):
            return
        self.attempts += 1
        activations = torch.zeros(len(jobs), 4096)
        self.tensors.append(weakref.ref(activations))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")


@pytest.fixture
async def never_fits(settings: Settings, dev_model_dir: Path, tmp_path: Path,
                     monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[NeverFits]:
    """A running engine whose GPU worker has a :class:`NeverFits` injector."""
    never = NeverFits()
    monkeypatch.setattr(core.image.factory, "GpuWorker",
                        functools.partial(GpuWorker, oom_injector=never))
    assert settings.retry_max_attempts == 6  # the default budget: room for 6 runs
    async with dev_engine(settings, dev_model_dir, tmp_path, batch_window_ms=0):
        yield never


def image_request(prompt: str) -> dict[str, Any]:
    return {"request_id": str(uuid.uuid4()), "conversation_id": f"c-{uuid.uuid4().hex[:6]}",
            "prompt": prompt, "width": 64, "height": 64, "num_inference_steps": 2,
            "optimize_prompt": False}


async def test_an_image_that_cannot_fit_costs_two_gpu_attempts_and_holds_no_tensor(
    never_fits: NeverFits, peer: PersonaPeer,
) -> None:
    never = never_fits
    huge = image_request("a huge panorama of the sea")
    await peer.publish("image", huge)
    answer = (await peer.answers_for([huge["request_id"]]))[huge["request_id"]]
    assert answer.kind == "failed"
    assert answer.event["error_code"] == "OUT_OF_MEMORY"
    assert answer.event["retryable"] is True  # for operators: a quieter GPU may fit it
    assert never.attempts == 2 == answer.event["attempts"]  # not re-run by the consume loop
    assert "Tried to allocate 20.00 GiB" in answer.event["message"]
    gc.collect()
    assert len(never.tensors) == 2 and all(ref() is None for ref in never.tensors)

    fine = image_request("a portrait of a woman in a cafe")
    await peer.publish("image", fine)
    answer = (await peer.answers_for([fine["request_id"]]))[fine["request_id"]]
    assert answer.kind == "completed", answer.event
    assert never.attempts == 2
