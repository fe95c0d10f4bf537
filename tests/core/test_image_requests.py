"""The image service's request fields on the tiny development model (CPU): stacked LoRAs
and their scales, several images in one batch, JPEG/WebP files, image-to-image from an
inline image and from a URL on a real local server, and the result cache for all of them.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from aiohttp import web
from PIL import Image
from prometheus_client import CollectorRegistry

from core.image import GpuWorker, build_dev_model, load_pipeline, make_dev_lora
from core.image.files import read_image_parameters
from core.image.init_image import InitImageLimits, InitImageLoader
from core.image.job import ImageJob
from core.image.params import ImageLimits
from core.image.prompts import PromptOptimizer
from core.image.results import ResultCache
from core.image.service import ImageResult, ImageService, ModelIdentity
from core.lora import LoraRegistry
from core.lora.adapters import HOTSWAP_SLOT
from core.metrics import EngineMetrics
from core.net import AllowedHosts
from core.outputs import OutputStore
from core.remembered import RememberedResults
from core.scheduling import PendingRequests, Placement, Priority
from schemas.errors import ErrorCode, InternalError, InvalidRequestError, UnknownLoraError
from schemas.events import ImageRequested, LoraWeight

STEPS = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_dev_model(tmp_path_factory.mktemp("model") / "flux-dev", seed=0)


@pytest.fixture(scope="module")
def lora_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("loras")
    registry = LoraRegistry(directory)
    made = tmp_path_factory.mktemp("made")
    for seed, (name, trigger) in enumerate((("sarah_v1", "sarah"), ("beach_style", None),
                                            ("red_dress", None)), start=1):
        weights = make_dev_lora(model_dir, made / f"{name}.safetensors", seed=seed)
        registry.register(name, weights, trigger_word=trigger, base_model="flux-tiny-dev")
    return directory


class InitServer:
    """A real image server on 127.0.0.1: ``GET /init.png`` answers ``body``; ``hits``
    counts the requests."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.hits = 0
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        async def image(_request: web.Request) -> web.Response:
            self.hits += 1
            return web.Response(body=self.body, content_type="image/png")

        app = web.Application()
        app.router.add_get("/init.png", image)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/init.png"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
def metrics() -> EngineMetrics:
    return EngineMetrics(CollectorRegistry())


@pytest.fixture
def worker(model_dir: Path, metrics: EngineMetrics) -> Iterator[GpuWorker]:
    model = load_pipeline(model_dir, device="cpu", use_fp16=False, memory_mode="none",
                          attention_backend="native", compile_transformer=False)
    gpu = GpuWorker(model, max_batch_size=4, batch_window_ms=0, lora_cache_size=4,
                    vae_tiling_threshold=1536, max_sequence_length=32, metrics=metrics)
    gpu.start()
    yield gpu
    gpu.stop(timeout=30)


def make_service(worker: GpuWorker, lora_dir: Path, store: OutputStore,
                 results: Path, http: httpx.AsyncClient | None = None) -> ImageService:
    limits = InitImageLimits(max_bytes=200_000, max_pixels=1_000_000,
                             allowed_hosts=AllowedHosts.parse("127.0.0.1"))
    return ImageService(
        worker, LoraRegistry(lora_dir), store, PromptOptimizer(None),
        ResultCache(RememberedResults(results)),
        ImageLimits(max_image_size=256, default_steps=STEPS, default_size=64),
        ModelIdentity("flux-tiny-dev", True, "tiny"), progress_interval=0.0,
        init_images=InitImageLoader(http, limits))


@pytest.fixture
async def service(worker: GpuWorker, lora_dir: Path, tmp_path: Path
                  ) -> AsyncIterator[ImageService]:
    async with httpx.AsyncClient() as http:
        yield make_service(worker, lora_dir, OutputStore(tmp_path / "outputs"),
                           tmp_path / "outputs" / ".results", http)


def request(**fields: Any) -> ImageRequested:
    base: dict[str, Any] = {
        "request_id": str(uuid.uuid4()), "conversation_id": "c", "prompt": "sarah in a park",
        "width": 64, "height": 64, "num_inference_steps": STEPS, "optimize_prompt": False,
        "seed": 3}
    return ImageRequested.model_validate({**base, **fields})


def path_of(service: ImageService, filename: str) -> Path:
    path = service._store.resolve(filename)  # the file a result names, as HTTP serves it
    assert path is not None, filename
    return path


def pixels(service: ImageService, result: ImageResult | str) -> np.ndarray[Any, Any]:
    name = result if isinstance(result, str) else result.filename
    with Image.open(path_of(service, name)) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


def batches(metrics: EngineMetrics) -> tuple[float, float]:
    """(pipeline calls, images) so far, from ``engine_image_batch_size``."""
    value = metrics.registry.get_sample_value
    return (value("engine_image_batch_size_count") or 0.0,
            value("engine_image_batch_size_sum") or 0.0)


def png_bytes(array: np.ndarray[Any, Any]) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


def gradient(width: int, height: int, flip: bool = False) -> np.ndarray[Any, Any]:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                    (x + y) * 127 // max(width + height - 2, 1)], axis=-1)
    return 255 - rgb if flip else rgb


# --- LoRAs: scales and stacking ---

async def test_a_stacked_lora_at_half_differs_from_either_alone(service: ImageService) -> None:
    character = await service.generate(request(character_lora_id="sarah_v1"))
    style = await service.generate(request(loras=[{"lora_id": "beach_style", "scale": 0.5}]))
    both = await service.generate(request(character_lora_id="sarah_v1",
                                          loras=[{"lora_id": "beach_style", "scale": 0.5}]))
    full = await service.generate(request(character_lora_id="sarah_v1",
                                          loras=[{"lora_id": "beach_style", "scale": 1.0}]))
    stacked = pixels(service, both)
    for alone in (character, style, full):
        assert np.abs(stacked - pixels(service, alone)).mean() > 1.0
    parameters = read_image_parameters(path_of(service, both.filename))
    assert parameters["lora"] == "sarah_v1" and parameters["loras"] == "beach_style:0.5"
    # the same content is answered from the result cache; once its file is gone it is
    # made again, exactly: the adapters stay loaded and are combined per request
    again = await service.generate(request(character_lora_id="sarah_v1", loras=[
        LoraWeight(lora_id="beach_style", scale=0.5).model_dump()]))
    assert again.filename == both.filename
    path_of(service, again.filename).unlink()
    assert np.array_equal(pixels(service, await service.generate(request(
        character_lora_id="sarah_v1", loras=[{"lora_id": "beach_style", "scale": 0.5}]))),
        stacked)


async def test_lora_scale_zero_is_the_base_model_exactly(service: ImageService) -> None:
    for prompt in ("sarah in a park", "a quiet park"):  # with and without the trigger word
        base = await service.generate(request(prompt=prompt))
        off = await service.generate(request(prompt=prompt, character_lora_id="sarah_v1",
                                             lora_scale=0.0))
        half = await service.generate(request(prompt=prompt, character_lora_id="sarah_v1",
                                              lora_scale=0.5))
        on = await service.generate(request(prompt=prompt, character_lora_id="sarah_v1"))
        assert off.prompt == base.prompt == prompt  # no trigger word for a LoRA left out
        assert np.array_equal(pixels(service, off), pixels(service, base))
        assert not np.array_equal(pixels(service, half), pixels(service, base))
        assert not np.array_equal(pixels(service, half), pixels(service, on))


async def test_an_unknown_stacked_lora_is_unknown_lora_before_any_work(
    service: ImageService, metrics: EngineMetrics
) -> None:
    with pytest.raises(UnknownLoraError) as raised:
        await service.generate(request(character_lora_id="sarah_v1",
                                       loras=[{"lora_id": "beach_style"},
                                              {"lora_id": "nobody_v9"}]))
    assert raised.value.code is ErrorCode.UNKNOWN_LORA
    assert raised.value.field == "loras.1.lora_id"  # type: ignore[attr-defined]
    assert "nobody_v9" in raised.value.message
    with pytest.raises(InvalidRequestError) as too_many:
        await service.generate(request(character_lora_id="sarah_v1", loras=[
            {"lora_id": "beach_style"}, {"lora_id": "red_dress"}, {"lora_id": "zoe"}]))
    assert too_many.value.field == "loras" and "MAX_LORAS_PER_REQUEST" in too_many.value.message
    assert batches(metrics) == (0, 0)


# --- several images per request ---

async def test_four_images_are_one_batch_with_consecutive_seeds(
    service: ImageService, metrics: EngineMetrics
) -> None:
    result = await service.generate(request(seed=40, num_inference_steps=STEPS, num_images=4))
    assert batches(metrics) == (1, 4)  # one pipeline call of four images
    assert [image.seed for image in result.images] == [40, 41, 42, 43]
    assert len({image.filename for image in result.images}) == 4
    assert (result.image_id, result.filename, result.seed) == (
        result.images[0].image_id, result.images[0].filename, 40)
    made = [pixels(service, image.filename) for image in result.images]
    assert all(not np.array_equal(made[0], other) for other in made[1:])
    for index, image in enumerate(result.images):
        assert read_image_parameters(path_of(service, image.filename))["seed"] == str(40 + index)
    single = await service.generate(request(seed=40))
    assert single.images == ()
    # batched float kernels may move a pixel by one level in 255, never more
    assert np.abs(made[0] - pixels(service, single)).max() <= 1
    replay = await service.generate(request(seed=40, num_images=4))
    assert [image.filename for image in replay.images] == [i.filename for i in result.images]
    path_of(service, result.images[2].filename).unlink()  # one file gone: made again
    again = await service.generate(request(seed=40, num_images=4))
    assert again.images[2].filename != result.images[2].filename
    assert np.array_equal(pixels(service, again.images[2].filename), made[2])


# --- file formats ---

@pytest.mark.parametrize(("output_format", "magic", "suffix"), [
    ("jpeg", b"\xff\xd8\xff", ".jpg"), ("webp", b"RIFF", ".webp"), ("png", b"\x89PNG", ".png")])
async def test_each_format_writes_its_bytes_with_the_parameters(
    service: ImageService, output_format: str, magic: bytes, suffix: str
) -> None:
    result = await service.generate(request(output_format=output_format, output_quality=70))
    path = path_of(service, result.filename)
    data = path.read_bytes()
    assert data.startswith(magic) and result.filename.endswith(suffix)
    assert result.url == f"/outputs/{result.filename}"
    if output_format == "webp":
        assert data[8:12] == b"WEBP"
    parameters = read_image_parameters(path)
    assert parameters["prompt"] == "sarah in a park" and parameters["seed"] == "3"
    if output_format == "png":  # a plain request's PNG carries what it always carried
        assert set(parameters) == {"prompt", "seed", "steps", "guidance_scale", "width",
                                   "height", "model", "development_model", "request_id"}


async def test_quality_changes_lossy_files_only(service: ImageService) -> None:
    small = await service.generate(request(output_format="jpeg", output_quality=5))
    large = await service.generate(request(output_format="jpeg", output_quality=100))
    assert path_of(service, small.filename).stat().st_size < \
        path_of(service, large.filename).stat().st_size
    png = await service.generate(request())
    assert (await service.generate(request(output_quality=5))).filename == png.filename


# --- image-to-image ---

async def test_image_to_image_from_an_inline_png_takes_its_size(
    service: ImageService, metrics: EngineMetrics
) -> None:
    init = png_bytes(gradient(100, 70))
    result = await service.generate(request(init_image=init, width=None, height=None,
                                            strength=0.5))
    assert (result.width, result.height) == (96, 64)  # rounded to multiples of 16
    parameters = read_image_parameters(path_of(service, result.filename))
    assert parameters["strength"] == "0.5" and len(parameters["init_image_sha256"]) == 64
    replay = await service.generate(request(init_image=init, width=None, height=None,
                                            strength=0.5))
    assert replay.filename == result.filename  # the cache keys on the image's bytes
    other = await service.generate(request(init_image=init, width=None, height=None,
                                           strength=0.75))
    assert other.filename != result.filename
    assert batches(metrics) == (2, 2)


async def test_strength_near_zero_follows_the_init_image_and_one_ignores_it(
    service: ImageService,
) -> None:
    first, second = gradient(64, 64), gradient(64, 64, flip=True)

    async def made(init: np.ndarray[Any, Any], strength: float) -> np.ndarray[Any, Any]:
        result = await service.generate(request(init_image=png_bytes(init),
                                                num_inference_steps=20, strength=strength))
        return pixels(service, result)

    # The tiny model's VAE has random weights: it reproduces no image, so the distance of
    # a result to its starting image says nothing (docs/image.md: over 10 seeds,
    # |out(0.05) - init| < |out(1.0) - init| held 11 times of 20). What does hold on every
    # seed measured is the starting image's say: how far apart the results for two opposite
    # starting images are, which shrinks as strength grows, to nothing at 1.
    strengths = (0.05, 0.3, 0.6, 1.0)  # 1, 6, 12 and 20 steps of 20
    apart = []
    for strength in strengths:
        made_from = [await made(init, strength) for init in (first, second)]
        apart.append(float(np.abs(made_from[0] - made_from[1]).mean()))
    # strength 0.05 starts from the init image: two different ones give different images
    assert apart[0] > 10
    assert apart[0] > apart[1] > apart[2] > apart[3]
    # strength 1 starts from pure noise: the init image has no say at all (same seed)
    assert apart[3] == 0


async def test_image_to_image_from_a_url_on_a_local_server(service: ImageService) -> None:
    init = png_bytes(gradient(40, 30))  # small: scaled up to 64 on its short side
    server = InitServer(init)
    await server.start()
    try:
        fetched = await service.generate(request(init_image_url=server.url, width=None,
                                                 height=None))
        assert server.hits == 1 and (fetched.width, fetched.height) == (80, 64)
        inline = await service.generate(request(init_image=init, width=None, height=None))
        assert inline.filename == fetched.filename  # same bytes, same strength: same key
    finally:
        await server.stop()


async def test_bad_init_images_are_refused_before_any_gpu_work(
    service: ImageService, metrics: EngineMetrics
) -> None:
    bomb = io.BytesIO()
    Image.new("L", (4000, 4000)).save(bomb, format="PNG")  # 16 Mpx in a few KB
    cases = {
        "init_image": [b"not an image at all", png_bytes(gradient(64, 64))[:80],
                       bomb.getvalue(), b"\x89PNG\r\n\x1a\n" + b"\x00" * 300_000],
    }
    for data in cases["init_image"]:
        with pytest.raises(InvalidRequestError) as raised:
            await service.generate(request(init_image=data))
        assert raised.value.field == "init_image", raised.value.message
    with pytest.raises(InvalidRequestError) as refused:  # a public-only rule, like training
        await service.generate(request(init_image_url="http://10.255.255.1/a.png"))
    assert refused.value.field == "init_image_url"
    assert "not allowed" in refused.value.message
    assert batches(metrics) == (0, 0)


async def test_image_to_image_progress_counts_the_steps_it_runs(
    service: ImageService,
) -> None:
    steps: list[tuple[int, int]] = []

    async def progress(step: int, total: int) -> None:
        steps.append((step, total))

    await service.generate(request(init_image=png_bytes(gradient(64, 64)),
                                   num_inference_steps=8, strength=0.5), progress)
    assert steps[-1] == (4, 4)  # the last half of an 8-step schedule


async def test_twins_of_an_image_to_image_request_share_its_work(
    service: ImageService, metrics: EngineMetrics
) -> None:
    init = png_bytes(gradient(64, 64))
    twins = await asyncio.gather(*(service.generate(request(init_image=init, seed=9))
                                   for _ in range(3)))
    assert len({twin.filename for twin in twins}) == 1
    assert batches(metrics) == (1, 1)


async def test_a_compiled_model_refuses_stacking_before_queueing(
    model_dir: Path, lora_dir: Path, tmp_path: Path, metrics: EngineMetrics
) -> None:
    # the refusal comes from the model's facts (one hotswap slot), checked before the
    # queue: a model that only says it has the slot shows it without compiling for 30 s
    model = replace(load_pipeline(model_dir, device="cpu", use_fp16=False,
                                  memory_mode="none", attention_backend="native",
                                  compile_transformer=False),
                    compiled=True, hotswap_slot=HOTSWAP_SLOT)
    gpu = GpuWorker(model, max_batch_size=4, batch_window_ms=0, lora_cache_size=4,
                    vae_tiling_threshold=1536, max_sequence_length=32, metrics=metrics)
    service = ImageService(
        gpu, LoraRegistry(lora_dir), OutputStore(tmp_path / "outputs"),
        PromptOptimizer(None), ResultCache(RememberedResults(tmp_path / "results")),
        ImageLimits(default_size=64), ModelIdentity("flux-tiny-dev", True, "tiny"))
    with pytest.raises(InvalidRequestError) as raised:
        service.check(request(character_lora_id="sarah_v1", loras=[{"lora_id": "beach_style"}]))
    assert raised.value.field == "loras" and "COMPILE_TRANSFORMER" in raised.value.message
    # one LoRA at any scale (the slot's scaling values), or at 0 (the base model), is what
    # the slot does
    service.check(request(character_lora_id="sarah_v1"))
    service.check(request(character_lora_id="sarah_v1", lora_scale=0.5))
    service.check(request(character_lora_id="sarah_v1", lora_scale=0.0,
                          loras=[{"lora_id": "beach_style"}]))


async def test_image_to_image_jobs_batch_only_with_their_own_kind(
    worker: GpuWorker, metrics: EngineMetrics
) -> None:
    entered, release = threading.Event(), threading.Event()

    def hold(_pipeline: Any) -> None:  # keeps the worker busy while the jobs queue up
        entered.set()
        assert release.wait(30)

    held = worker.submit_exclusive(hold)
    assert entered.wait(30)
    start = Image.fromarray(gradient(64, 64).astype(np.uint8))
    plain = ImageJob(prompt="a park", negative_prompt=None, width=64, height=64, steps=4,
                     guidance=3.5, true_cfg_scale=1.0, seed=1, lora=None)
    jobs = [plain, replace(plain, seed=2), replace(plain, init_image=start, strength=0.5),
            replace(plain, seed=2, init_image=start, strength=0.5),
            replace(plain, init_image=start, strength=0.75, count=2)]
    items = [worker.enqueue(job) for job in jobs]
    release.set()
    held.result(30)
    results = [item.future.result(30) for item in items]
    assert batches(metrics) == (3, 6)  # text pair, image pair at 0.5, and the pair at 0.75
    assert isinstance(results[-1], list) and len(results[-1]) == 2


# --- writing the files, and work shared by callers ---

class FailingClock:
    """An :class:`OutputStore` clock (asked once as each file is published) that raises
    ``OSError`` on call number ``fail_at``, like a disk failing between two files."""

    def __init__(self, fail_at: int) -> None:
        self.fail_at = fail_at
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        if self.calls == self.fail_at:
            raise OSError(28, "No space left on device")
        return time.time()


async def test_a_failed_write_leaves_no_file_and_no_entry(
    worker: GpuWorker, lora_dir: Path, tmp_path: Path
) -> None:
    clock = FailingClock(fail_at=3)  # the third of four images cannot be published
    outputs = tmp_path / "outputs"
    service = make_service(worker, lora_dir, OutputStore(outputs, clock=clock),
                           tmp_path / "results")
    with pytest.raises(InternalError) as raised:
        await service.generate(request(seed=60, num_images=4))
    assert "No space" not in raised.value.message  # no internals in the error text
    assert list(outputs.iterdir()) == []  # the two files written before are gone too
    assert list((tmp_path / "results").glob("*.json")) == []
    again = await service.generate(request(seed=60, num_images=4))  # the disk is back
    assert sorted(p.name for p in outputs.iterdir()) == sorted(
        image.filename for image in again.images)


async def test_a_result_that_cannot_be_remembered_is_still_answered(
    worker: GpuWorker, lora_dir: Path, tmp_path: Path, metrics: EngineMetrics,
    caplog: pytest.LogCaptureFixture
) -> None:
    results = tmp_path / "results"
    service = make_service(worker, lora_dir, OutputStore(tmp_path / "outputs"), results)
    results.rmdir()
    results.write_text("a file where the directory was")  # every cache write fails
    made = await service.generate(request(seed=61))
    assert path_of(service, made.filename).is_file()
    assert "image result not remembered" in caplog.text
    assert batches(metrics) == (1, 1)


@pytest.mark.parametrize("comes_again", [True, False], ids=["kept", "stopped"])
async def test_a_running_image_abandoned_by_its_caller_is_kept_only_if_it_comes_again(
    service: ImageService, metrics: EngineMetrics, comes_again: bool
) -> None:
    running = asyncio.Event()

    async def first_step(step: int, total: int) -> None:
        running.set()

    asked = request(seed=62, num_inference_steps=20)
    registry = PendingRequests()  # as the consume loop registers a Kafka request
    pending = registry.add(asked.request_id, "c", "image", Priority.INTERACTIVE)
    if not comes_again:
        registry.cancel("c", asked.request_id)
    placement = replace(pending.placement(), keep_when_abandoned=pending)
    first = asyncio.create_task(service.generate(asked, first_step, placement))
    await asyncio.wait_for(running.wait(), 30)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    steps: list[int] = []

    async def seen(step: int, total: int) -> None:
        steps.append(step)

    again = await service.generate(asked, seen, Placement(owner="c"))  # the next delivery
    assert path_of(service, again.filename).is_file()
    if comes_again:  # the kept work was joined (or answered from the cache): made once
        assert steps == [] and batches(metrics) == (1, 1)
        assert registry.find(asked.request_id) == []  # forgotten when that work ended
    else:  # the work was stopped at its next step: made afresh, with its own progress
        assert steps[-1] == 20 and batches(metrics) == (1, 1)
        assert not pending.kept  # the consume loop forgets it as it answers it


async def test_a_kept_image_whose_request_is_cancelled_stops_at_its_next_step(
    service: ImageService, metrics: EngineMetrics
) -> None:
    asked = request(seed=63, width=256, height=256, num_inference_steps=100)
    registry = PendingRequests()
    pending = registry.add(asked.request_id, "c", "image", Priority.INTERACTIVE)
    running = asyncio.Event()

    async def first_step(step: int, total: int) -> None:
        running.set()

    first = asyncio.create_task(service.generate(
        asked, first_step, replace(pending.placement(), keep_when_abandoned=pending)))
    await asyncio.wait_for(running.wait(), 30)
    first.cancel()  # its partition revoked: the running image is kept
    with pytest.raises(asyncio.CancelledError):
        await first
    assert registry.find(asked.request_id) == [pending]  # still cancellable here
    assert registry.cancel("c", asked.request_id) == [pending]  # the user leaves
    await registry.wait_until(lambda r: not r.find(asked.request_id), timeout=30)
    after = await service.generate(request(seed=64))  # the GPU's next job
    assert batches(metrics) == (1, 1)  # the cancelled image made nothing
    assert [p.name for p in service._store.directory.iterdir() if p.is_file()] == [
        after.filename]
