"""Precision: FLUX never runs in float16 (its transformer and T5 overflow there: black
images), USE_FP16 notwithstanding, and says so in the log and in ``/health``; a LoRA trains
float32 weights on a half-precision transformer. No GPU here: the dtype decision is a pure
function, and the training path runs on the CPU with a bfloat16 transformer."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from core.health import EngineHealth, ImageModelInfo
from core.image import LoadedModel, load_pipeline
from core.image.loader import choose_precision
from core.training.adapter import attached_adapter
from core.training.encode import TrainingCache, encode_training_data
from core.training.pixels import to_pixels
from core.training.trainer import ChunkPlan, run_chunk
from tests.core.test_training_images import photos


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
@pytest.mark.parametrize("use_fp16", [False, True])
def test_cuda_runs_bfloat16_even_when_fp16_is_asked_for(device: str, use_fp16: bool) -> None:
    precision = choose_precision(device, use_fp16)
    assert precision.dtype == torch.bfloat16
    if use_fp16:
        assert precision.note is not None
        assert "USE_FP16" in precision.note and "bfloat16" in precision.note
    else:
        assert precision.note is None


@pytest.mark.parametrize("use_fp16", [False, True])
def test_the_cpu_runs_float32(use_fp16: bool) -> None:
    precision = choose_precision("cpu", use_fp16)
    assert precision.dtype == torch.float32
    assert (precision.note is not None) == use_fp16


def test_float16_is_never_chosen() -> None:
    assert all(choose_precision(device, fp16).dtype != torch.float16
               for device in ("cpu", "cuda", "cuda:1") for fp16 in (False, True))


def load(model_dir: Path, use_fp16: bool = False) -> LoadedModel:
    return load_pipeline(model_dir, device="cpu", use_fp16=use_fp16, memory_mode="none",
                         attention_backend="native", compile_transformer=False)


def test_the_loaded_model_and_the_log_say_which_dtype_and_why(
    dev_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="core.image.loader")
    model = load(dev_model_dir, use_fp16=True)
    assert model.dtype == torch.float32 and model.dtype_name == "float32"
    assert model.pipeline.transformer.dtype == torch.float32
    assert model.precision_note is not None and model.precision_note in caplog.text
    assert load(dev_model_dir).precision_note is None


def test_health_reports_the_dtype() -> None:
    health = EngineHealth(voice_backend="local")
    health.image_model = ImageModelInfo(name="FLUX.1-dev", loaded=True, dtype="bfloat16")
    assert health.snapshot()["image_model"]["dtype"] == "bfloat16"
    assert EngineHealth(voice_backend="local").snapshot()["image_model"]["dtype"] is None


# --- training: float32 LoRA weights on a bfloat16 transformer ---


@pytest.fixture
def half_model(dev_model_dir: Path) -> tuple[LoadedModel, TrainingCache]:
    """The tiny model with its transformer in bfloat16 (as on CUDA), and training data
    encoded with its fp32 encoders."""
    model = load(dev_model_dir)
    cache = encode_training_data(model.pipeline, to_pixels(photos(5), 64), "a photo of zqx",
                                 max_sequence_length=32)
    model.pipeline.transformer.to(torch.bfloat16)
    return model, cache


def test_the_adapter_is_float32_on_a_bfloat16_transformer(
    half_model: tuple[LoadedModel, TrainingCache],
) -> None:
    transformer = half_model[0].pipeline.transformer
    with attached_adapter(transformer, "precision_test", weights=None, init_seed=1,
                          gradient_checkpointing=False) as params:
        assert params and all(p.dtype == torch.float32 and p.requires_grad for p in params)
        frozen = [p for p in transformer.parameters() if not p.requires_grad]
        assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert not getattr(transformer, "peft_config", None)  # removed again
    assert all(p.dtype == torch.bfloat16 for p in transformer.parameters())


def test_a_chunk_trains_float32_weights_on_a_bfloat16_transformer(
    half_model: tuple[LoadedModel, TrainingCache],
) -> None:
    pipeline, cache = half_model[0].pipeline, half_model[1]
    plan = ChunkPlan(adapter_name="precision_test", seed=5, end_step=3, learning_rate=1e-3,
                     batch_size=1)
    first = run_chunk(pipeline, cache, plan)
    weights = first.state.weights
    assert first.state.step == 3 and weights
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())
    assert first.state.loss is not None and first.state.loss == first.state.loss  # no NaN
    # resumed from that state, the adapter starts from the exact fp32 weights it saved
    resumed = run_chunk(pipeline, cache, replace(plan, end_step=4, state=first.state))
    assert resumed.state.step == 4
    assert any(not torch.equal(weights[k], resumed.state.weights[k]) for k in weights)
    assert all(p.dtype == torch.bfloat16 for p in pipeline.transformer.parameters())
