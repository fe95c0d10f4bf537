"""The image result cache's key holds every setting that changes the pixels: an engine
started with other such settings on the same OUTPUT_DIR makes the image again instead of
replaying the other settings' pixels; settings that change no pixel keep replays free.
Whole image cores built from settings (the factory), on the tiny model (CPU), 64 px."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client import CollectorRegistry

from core.image.factory import build_image_service
from core.image.params import ImageLimits, resolve_params
from core.image.results import Rendering, fingerprint
from core.image.service import ImageResult
from core.metrics import EngineMetrics
from core.outputs import OutputStore
from core.settings import load_settings
from schemas.events import ImageRequested

LONG_PROMPT = "a park with " + ", ".join(f"tree number {i}" for i in range(40))


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


def request(**fields: Any) -> ImageRequested:
    return ImageRequested.model_validate(
        {"request_id": "r-1", "conversation_id": "c", "prompt": "a park", "width": 64,
         "height": 64, "num_inference_steps": 2, "optimize_prompt": False, "seed": 7,
         **fields})


async def answer(tmp_path: Path, model: Path, http: httpx.AsyncClient, asked: ImageRequested,
                 **settings: Any) -> tuple[ImageResult, np.ndarray]:
    """``asked`` answered by an engine started with ``settings`` on ``tmp_path``'s
    OUTPUT_DIR (shared by every engine of a test), stopped afterwards."""
    loaded = load_settings(_env_file=None, output_dir=tmp_path / "outputs",
                           lora_output_dir=tmp_path / "loras", max_image_size=128, **settings)
    store = OutputStore(loaded.output_dir)
    service, worker = await build_image_service(loaded, model, store, http,
                                                EngineMetrics(CollectorRegistry()))
    try:
        made = await service.generate(asked)
    finally:
        worker.stop(timeout=60)
    path = store.resolve(made.filename)
    assert path is not None
    return made, np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


@pytest.mark.parametrize(("before", "after", "fields"), [
    ({"flux_max_sequence_length": 32}, {"flux_max_sequence_length": 256},
     {"prompt": LONG_PROMPT}),
    ({"true_cfg_scale": 4.0}, {"true_cfg_scale": 1.5}, {"negative_prompt": "blurry"}),
], ids=["FLUX_MAX_SEQUENCE_LENGTH", "TRUE_CFG_SCALE"])
async def test_a_setting_that_changes_the_pixels_makes_the_image_again(
    tmp_path: Path, dev_model_dir: Path, http: httpx.AsyncClient,
    before: dict[str, Any], after: dict[str, Any], fields: dict[str, Any],
) -> None:
    first, first_pixels = await answer(tmp_path, dev_model_dir, http, request(**fields),
                                       **before)
    second, second_pixels = await answer(tmp_path, dev_model_dir, http, request(**fields),
                                         **after)
    assert second.filename != first.filename  # made, not replayed ...
    assert not np.array_equal(second_pixels, first_pixels)  # ... for other pixels
    third, _ = await answer(tmp_path, dev_model_dir, http, request(**fields), **before)
    assert third.filename == first.filename  # and each setting's replay stays free


async def test_vae_tiling_threshold_keys_the_sizes_it_tiles(
    tmp_path: Path, dev_model_dir: Path, http: httpx.AsyncClient
) -> None:
    large, small = request(width=128, height=128), request()
    first, _ = await answer(tmp_path, dev_model_dir, http, large, vae_tiling_threshold=1536)
    tiled, _ = await answer(tmp_path, dev_model_dir, http, large, vae_tiling_threshold=64)
    assert tiled.filename != first.filename  # 128 px decoded in tiles now: made again
    plain, _ = await answer(tmp_path, dev_model_dir, http, small, vae_tiling_threshold=1536)
    again, _ = await answer(tmp_path, dev_model_dir, http, small, vae_tiling_threshold=64)
    assert again.filename == plain.filename  # 64 px is not tiled under either: a replay


async def test_settings_that_change_no_pixel_keep_replays_free(
    tmp_path: Path, dev_model_dir: Path, http: httpx.AsyncClient
) -> None:
    first, _ = await answer(tmp_path, dev_model_dir, http, request(negative_prompt="blurry"))
    # batching, caches, progress and USE_FP16 (float32 on a CPU either way) draw the same
    second, _ = await answer(tmp_path, dev_model_dir, http, request(negative_prompt="blurry"),
                             batch_window_ms=50, lora_cache_size=2, progress_interval=1.0,
                             use_fp16=True, result_cache_max_entries=50)
    assert second.filename == first.filename


def test_each_rendering_setting_changes_the_key_where_it_applies() -> None:
    limits = ImageLimits(max_image_size=2048)
    plain = resolve_params(request(width=1024, height=1024), limits)
    negative = resolve_params(request(width=1024, height=1024, negative_prompt="blurry"),
                              limits)
    rendering = Rendering(device="cuda:0", dtype="bfloat16", attention_backend="_flash_3",
                          acceleration="quantization=none;step_cache=none",
                          max_sequence_length=512, true_cfg_scale=4.0,
                          vae_tiling_threshold=1536)

    def key(params: Any, **changes: Any) -> str:
        return fingerprint(params, "weights", None,
                           rendering=dataclasses.replace(rendering, **changes))

    for params in (plain, negative):
        assert key(params) != key(params, dtype="float32")
        assert key(params) != key(params, device="cpu")
        assert key(params) != key(params, attention_backend="native")
        assert key(params) != key(params, acceleration="quantization=fp8;step_cache=none")
        assert key(params) != key(params, max_sequence_length=256)
        assert key(params) != key(params, vae_tiling_threshold=512)  # 1024 px now tiled
        assert key(params) == key(params, vae_tiling_threshold=1024)  # still not tiled
        assert key(params) == key(params, device="cuda:1")  # the same kind of device
    assert key(negative) != key(negative, true_cfg_scale=1.5)
    assert key(plain) == key(plain, true_cfg_scale=1.5)  # without a negative prompt: unused

