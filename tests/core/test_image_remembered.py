"""ImageService.remembered: the result generate answered a request with, from the result
cache, found without the GPU or a download (a redelivered request, cancelled or expired
since, is answered with it); none for what was never answered to that request (a new
request with the same content included), or whose key needs a download."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from core.answers import Answers
from core.image.init_image import InitImageLimits, InitImageLoader
from core.image.params import ImageLimits
from core.image.prompts import PromptOptimizer
from core.image.results import ResultCache
from core.image.service import ImageService, ModelIdentity
from core.image.worker import GpuWorker
from core.lora.registry import LoraRegistry
from core.metrics import EngineMetrics
from core.net import AllowedHosts
from core.outputs import OutputStore
from core.remembered import RememberedResults
from tests.core.test_image_requests import (  # noqa: F401  (fixtures)
    STEPS,
    InitServer,
    batches,
    gradient,
    lora_dir,
    metrics,
    model_dir,
    png_bytes,
    request,
    worker,
)


@pytest.fixture
async def service(worker: GpuWorker, lora_dir: Path, tmp_path: Path  # noqa: F811
                  ) -> AsyncIterator[ImageService]:
    """As tests.core.test_image_requests makes it, recording its answers."""
    outputs = tmp_path / "outputs"
    async with httpx.AsyncClient() as http:
        yield ImageService(
            worker, LoraRegistry(lora_dir), OutputStore(outputs), PromptOptimizer(None),
            ResultCache(RememberedResults(outputs / ".results")),
            ImageLimits(max_image_size=256, default_steps=STEPS, default_size=64),
            ModelIdentity("flux-tiny-dev", True, "tiny"), progress_interval=0.0,
            init_images=InitImageLoader(http, InitImageLimits(
                max_bytes=200_000, max_pixels=1_000_000,
                allowed_hosts=AllowedHosts.parse("127.0.0.1"))),
            answers=Answers(RememberedResults(outputs / ".answers")))


async def test_a_made_image_is_remembered_for_its_request_with_its_files_and_no_gpu_work(
    service: ImageService, metrics: EngineMetrics  # noqa: F811
) -> None:
    asked = request()
    assert await service.remembered(asked) is None
    made = await service.generate(asked)
    calls = batches(metrics)
    found = await service.remembered(asked)  # the same request again
    assert found is not None
    assert (found.filename, found.url, found.seed) == (made.filename, made.url, made.seed)
    assert batches(metrics) == calls
    # a new request with the same content was never answered: nothing for it
    assert await service.remembered(request()) is None
    # the same request_id with other content neither
    assert await service.remembered(request(request_id=asked.request_id, seed=4)) is None


async def test_a_request_answered_from_the_cache_is_remembered_too(
    service: ImageService,
) -> None:
    await service.generate(request())
    twin = request()  # the same content: answered from the result cache
    answered = await service.generate(twin)
    found = await service.remembered(twin)
    assert found is not None and found.url == answered.url


async def test_an_inline_starting_image_keys_it_a_url_is_not_fetched_for_it(
    service: ImageService,
) -> None:
    init = png_bytes(gradient(40, 30))
    asked = request(init_image=init, width=None, height=None)
    inline = await service.generate(asked)
    found = await service.remembered(asked)
    assert found is not None and found.filename == inline.filename
    server = InitServer(init)
    await server.start()
    try:
        by_url = request(request_id=asked.request_id, init_image_url=server.url, width=None,
                         height=None)
        assert await service.remembered(by_url) is None
        assert server.hits == 0  # same key, yet knowing it would take the download
    finally:
        await server.stop()


async def test_an_invalid_request_has_nothing_remembered_and_raises_nothing(
    service: ImageService,
) -> None:
    assert await service.remembered(request(character_lora_id="no_such_lora")) is None
    assert await service.remembered(request(width=100_000)) is None
