"""Training chunks in the GPU worker share the pipeline with image jobs: a chunk leaves it
exactly as it found it (base model and the registry's LoRAs alike), and a training split
into chunks ends with the very weights of one that never stopped."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from core.image import GpuWorker, ImageJob, LoadedModel, load_pipeline, make_dev_lora
from core.lora import LoraInfo, LoraRegistry
from core.training.encode import TrainingCache, encode_training_data
from core.training.pixels import to_pixels
from core.training.trainer import ChunkPlan, run_chunk
from tests.core.test_training_images import photos


@pytest.fixture
def model(dev_model_dir: Path) -> LoadedModel:
    return load_pipeline(dev_model_dir, device="cpu", use_fp16=False, memory_mode="none",
                         attention_backend="native", compile_transformer=False)


@pytest.fixture
async def worker(model: LoadedModel) -> AsyncIterator[GpuWorker]:
    worker = GpuWorker(model, max_batch_size=4, batch_window_ms=0, lora_cache_size=4,
                       vae_tiling_threshold=1536, max_sequence_length=32)
    worker.start()
    yield worker
    worker.stop(timeout=30)


@pytest.fixture
def lora(dev_model_dir: Path, tmp_path: Path) -> LoraInfo:
    weights = make_dev_lora(dev_model_dir, tmp_path / "made" / "zoe_v1.safetensors", seed=3)
    return LoraRegistry(tmp_path / "loras").register("zoe_v1", weights, trigger_word="zoe",
                                                     base_model="flux-tiny-dev")


@pytest.fixture
async def cache(worker: GpuWorker) -> TrainingCache:
    pixels = to_pixels(photos(5), 64)
    return await worker.run_exclusive(
        lambda pipeline: encode_training_data(pipeline, pixels, "a photo of zqx",
                                              max_sequence_length=32))


def job(lora: LoraInfo | None = None) -> ImageJob:
    return ImageJob(prompt="a photo of zqx", negative_prompt=None, width=64, height=64,
                    steps=3, guidance=3.5, true_cfg_scale=1.0, seed=11, lora=lora)


def pixels(image: Any) -> np.ndarray:
    return np.asarray(image)


def plan(end_step: int, **changes: Any) -> ChunkPlan:
    return replace(ChunkPlan(adapter_name="training_test", seed=5, end_step=end_step,
                             learning_rate=1e-3, batch_size=1), **changes)


async def test_a_chunk_leaves_the_base_model_and_the_registry_loras_as_they_were(
    worker: GpuWorker, cache: TrainingCache, lora: LoraInfo
) -> None:
    base = pixels(await worker.generate(job()))
    with_lora = pixels(await worker.generate(job(lora)))
    flags_before = await worker.run_exclusive(_flags)
    await worker.run_exclusive(lambda p: run_chunk(p, cache, plan(5)))
    assert await worker.run_exclusive(_flags) == flags_before
    assert np.array_equal(pixels(await worker.generate(job())), base)
    assert np.array_equal(pixels(await worker.generate(job(lora))), with_lora)
    await worker.run_exclusive(lambda p: run_chunk(p, cache, plan(5)))  # LoRA active now
    assert np.array_equal(pixels(await worker.generate(job(lora))), with_lora)
    assert np.array_equal(pixels(await worker.generate(job())), base)
    assert worker.loaded_loras == ["zoe_v1"]  # the worker's set was never reset


async def test_a_chunk_that_fails_also_restores_the_pipeline(
    worker: GpuWorker, cache: TrainingCache
) -> None:
    base = pixels(await worker.generate(job()))
    flags_before = await worker.run_exclusive(_flags)
    broken = replace(cache, text=replace(cache.text, pooled=cache.text.pooled[:, :3]))
    with pytest.raises(RuntimeError):
        await worker.run_exclusive(lambda p: run_chunk(p, broken, plan(3)))
    assert await worker.run_exclusive(_flags) == flags_before
    assert np.array_equal(pixels(await worker.generate(job())), base)


async def test_chunks_resumed_from_their_state_end_like_one_uninterrupted_run(
    worker: GpuWorker, cache: TrainingCache
) -> None:
    straight = await worker.run_exclusive(lambda p: run_chunk(p, cache, plan(30)))
    first = await worker.run_exclusive(lambda p: run_chunk(p, cache, plan(12)))
    second = await worker.run_exclusive(
        lambda p: run_chunk(p, cache, plan(30, state=first.state)))
    assert (first.state.step, second.state.step, straight.state.step) == (12, 30, 30)
    assert straight.state.weights.keys() == second.state.weights.keys()
    assert all(torch.equal(straight.state.weights[k], second.state.weights[k])
               for k in straight.state.weights)
    assert straight.state.loss == second.state.loss
    # A and B of to_q/k/v/out.0 in the double block, of to_q/k/v in the single one
    assert len(straight.state.weights) == 2 * (4 + 3)


def _flags(pipeline: Any) -> tuple[Any, ...]:
    transformer = pipeline.transformer
    return (
        tuple(sorted(getattr(transformer, "peft_config", {}) or {})),
        tuple((n, p.requires_grad) for n, p in transformer.named_parameters()),
        transformer.training,
        bool(getattr(transformer, "gradient_checkpointing", False)),
        sum(1 for _ in transformer.modules()),
    )
