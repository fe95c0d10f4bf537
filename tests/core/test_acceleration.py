"""QUANTIZATION and STEP_CACHE: refused at start-up where they cannot run, and with a step
cache the GPU worker still gives the same pixels for the same request, at its size; every
step cache runs on a compiled transformer with the eager model's pixels."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from core.image import GpuWorker, ImageJob, build_dev_model, load_pipeline
from core.image.acceleration import Acceleration
from core.image.factory import acceleration_of
from core.image.loader import LoadedModel, ModelLoadError
from core.image.warmup import compiled_graphs
from core.metrics import EngineMetrics
from core.settings import ConfigurationError, load_settings
from schemas.errors import RequestCancelledError
from tests.core.conftest import start_worker as start

WAIT = 120


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_dev_model(tmp_path_factory.mktemp("model") / "flux-dev", seed=0)


def load(model_dir: Path, acceleration: Acceleration, *, compile_transformer: bool = False
         ) -> LoadedModel:
    return load_pipeline(model_dir, device="cpu", use_fp16=False, memory_mode="none",
                         attention_backend="native", compile_transformer=compile_transformer,
                         acceleration=acceleration)


def job(seed: int = 3, **changes: Any) -> ImageJob:
    base = ImageJob(prompt="a photo of a woman", negative_prompt=None, width=64, height=80,
                    steps=10, guidance=3.5, true_cfg_scale=1.0, seed=seed, lora=None)
    return replace(base, **changes)


def pixels(image: Any) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


# --- refused at start-up, before any weight is read ---


def test_fp8_without_cuda_is_refused_naming_quantization(model_dir: Path) -> None:
    with pytest.raises(ModelLoadError) as caught:
        load(model_dir, Acceleration(quantization="fp8"))
    assert caught.value.setting == "QUANTIZATION"
    assert "QUANTIZATION=fp8" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.filterwarnings("ignore::DeprecationWarning:torch")  # inductor's own imports
@pytest.mark.parametrize(("cache", "threshold"), [
    ("taylorseer", None), ("first_block", 0.5), ("mag", 0.5)])
def test_a_step_cache_on_compiled_blocks_gives_the_eager_pixels_without_recompiling(
    model_dir: Path, cache: str, threshold: float | None
) -> None:
    # thresholds high enough that the tiny model skips steps: the cache is really on
    acceleration = Acceleration(step_cache=cache, threshold=threshold, interval=2)
    compiled = load(model_dir, acceleration, compile_transformer=True)
    eager = load(model_dir, acceleration)
    plain = load(model_dir, Acceleration())
    call(compiled, steps=1)  # compiles, as the warm-up does
    graphs = compiled_graphs()
    with torch.compiler.set_stance("fail_on_recompile"):
        made = {(steps, size): call(compiled, steps=steps, size=size)
                for steps, size in ((4, 80), (3, 96))}
    assert compiled_graphs() == graphs
    noise = max(np.abs(image - call(eager, steps=steps, size=size)).max()
                for (steps, size), image in made.items())
    assert noise <= 2.0  # float noise, in 0-255 levels
    # without the cache, other pixels: far more than the noise
    assert np.abs(made[(4, 80)] - call(plain, steps=4, size=80)).max() > max(0.2, 20 * noise)


def call(model: LoadedModel, *, steps: int, size: int = 80) -> np.ndarray:
    model.before_call(steps)
    images = model.pipeline(prompt="a lighthouse", width=size, height=size,
                            num_inference_steps=steps, guidance_scale=3.5, output_type="np",
                            generator=torch.Generator().manual_seed(7)).images
    return np.asarray(images, dtype=np.float64) * 255


@pytest.mark.parametrize(("name", "value"), [
    ("STEP_CACHE", "teacache"), ("QUANTIZATION", "int4"), ("STEP_CACHE_INTERVAL", "1"),
    ("STEP_CACHE_THRESHOLD", "2"),
])
def test_unknown_or_out_of_range_values_are_refused(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError, match=name):
        load_settings(_env_file=None)


def test_settings_reach_the_model_and_the_result_cache_key(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STEP_CACHE", "taylorseer")
    monkeypatch.setenv("STEP_CACHE_INTERVAL", "4")
    acceleration = acceleration_of(load_settings(_env_file=None))
    assert acceleration == Acceleration(step_cache="taylorseer", interval=4)
    keys = {Acceleration().key, acceleration.key, Acceleration(step_cache="taylorseer").key,
            Acceleration(step_cache="mag").key, Acceleration(quantization="fp8").key}
    assert len(keys) == 5  # other settings, other pixels: never a cache hit across them
    assert acceleration.describe() == {"quantization": "none", "step_cache": "taylorseer",
                                       "step_cache_interval": 4}


# --- the same request gives the same pixels, with the cache on ---


@pytest.mark.parametrize("cache", ["taylorseer", "first_block", "mag"])
async def test_a_step_cache_gives_the_requested_size_and_the_same_pixels_twice(
    model_dir: Path, workers: list[GpuWorker], cache: str
) -> None:
    worker = start(workers, load(model_dir, Acceleration(step_cache=cache)))
    first = await worker.generate(job())
    assert first.size == (64, 80) and first.mode == "RGB"
    other_steps = await worker.generate(job(steps=6))  # mag resizes its ratios, then back
    assert other_steps.size == (64, 80)
    again = await worker.generate(job())
    assert np.array_equal(pixels(first), pixels(again))


async def test_taylorseer_changes_the_pixels_a_little_not_the_picture(
    model_dir: Path, workers: list[GpuWorker]
) -> None:
    plain = await start(workers, load(model_dir, Acceleration())).generate(job())
    cached = await start(workers, load(model_dir, Acceleration(step_cache="taylorseer"))
                         ).generate(job())
    difference = np.abs(pixels(plain) - pixels(cached)).mean()
    assert 0 < difference < 32, difference  # predicted steps: close, not identical


async def test_a_call_cut_short_leaves_nothing_behind_in_the_cache(
    model_dir: Path, workers: list[GpuWorker]
) -> None:
    """A cancelled call stops between two steps with the hooks half filled; the next call
    of the same request still gives the pixels of an undisturbed run."""
    worker = start(workers, load(model_dir, Acceleration(step_cache="taylorseer")))
    reference = await worker.generate(job())
    third_step = threading.Event()

    def progress(step: int, _total: int) -> None:
        if step == 3:
            third_step.set()

    item = worker.enqueue(job(seed=99, progress=progress))
    assert third_step.wait(WAIT)
    item.withdraw()
    with pytest.raises(RequestCancelledError):
        item.future.result(WAIT)
    assert np.array_equal(pixels(await worker.generate(job())), pixels(reference))


async def test_a_content_driven_cache_never_batches_two_requests(
    model_dir: Path, workers: list[GpuWorker]
) -> None:
    metrics = EngineMetrics(CollectorRegistry())
    worker = start(workers, load(model_dir, Acceleration(step_cache="first_block")), metrics,
                   batch_window_ms=2000)
    futures = [worker.submit(job(seed=seed)) for seed in range(3)]
    for future in futures:
        future.result(WAIT)
    value = metrics.registry.get_sample_value
    assert value("engine_image_batch_size_count") == 3
    assert value("engine_image_batch_size_sum") == 3
