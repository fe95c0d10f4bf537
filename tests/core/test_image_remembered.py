"""ImageService.remembered: the result generate would answer from the result cache, found
without the GPU or a download (a redelivered request, cancelled or expired since, is
answered with it); none for what was never made, or whose key needs a download."""

from __future__ import annotations

from core.image.service import ImageService
from core.metrics import EngineMetrics
from tests.core.test_image_requests import (  # noqa: F401  (fixtures)
    InitServer,
    batches,
    gradient,
    lora_dir,
    metrics,
    model_dir,
    png_bytes,
    request,
    service,
    worker,
)


async def test_a_made_image_is_remembered_with_its_files_and_no_gpu_work(
    service: ImageService, metrics: EngineMetrics  # noqa: F811
) -> None:
    assert await service.remembered(request()) is None
    made = await service.generate(request())
    calls = batches(metrics)
    found = await service.remembered(request())  # another request_id, the same content
    assert found is not None
    assert (found.filename, found.url, found.seed) == (made.filename, made.url, made.seed)
    assert batches(metrics) == calls
    assert await service.remembered(request(seed=4)) is None


async def test_an_inline_starting_image_keys_it_a_url_is_not_fetched_for_it(
    service: ImageService,  # noqa: F811
) -> None:
    init = png_bytes(gradient(40, 30))
    inline = await service.generate(request(init_image=init, width=None, height=None))
    found = await service.remembered(request(init_image=init, width=None, height=None))
    assert found is not None and found.filename == inline.filename
    server = InitServer(init)
    await server.start()
    try:
        assert await service.remembered(request(init_image_url=server.url, width=None,
                                                height=None)) is None
        assert server.hits == 0  # same key, yet knowing it would take the download
    finally:
        await server.stop()


async def test_an_invalid_request_has_nothing_remembered_and_raises_nothing(
    service: ImageService,  # noqa: F811
) -> None:
    assert await service.remembered(request(character_lora_id="no_such_lora")) is None
    assert await service.remembered(request(width=100_000)) is None
