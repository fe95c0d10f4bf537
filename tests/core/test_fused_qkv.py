"""FUSE_QKV and ATTENTION_BACKEND=auto: the compiled fast path keeps what users use.

A compiled model (COMPILE_TRANSFORMER=true) fuses each attention's query, key and value
projections into one, and still runs the hot-swapped LoRA at any ``lora_scale``: its
images are the eager model's (float noise), at several sizes, switching LoRAs, scales and
the base model without a recompilation; the projections' own base weights are gone (only
the fused ones compute), and the model holds no second copy of them. An eager model, or
FUSE_QKV=false, is not fused. ``auto`` picks a kernel by what the machine has."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from core.image import GpuWorker, ImageJob, load_pipeline
from core.image.acceleration import Acceleration, acceleration_warnings
from core.image.attention import auto_candidates, resolve_attention_backend
from core.image.devmodel import make_dev_lora
from core.image.fused_qkv import FusedProjection, quantizable
from core.image.loader import LoadedModel
from core.image.warmup import compiled_graphs
from core.lora import LoraInfo, LoraRegistry
from core.settings import load_settings
from core.training.encode import encode_training_data
from core.training.pixels import to_pixels
from core.training.trainer import ChunkPlan, run_chunk
from tests.core.conftest import start_worker as start
from tests.core.test_training_images import photos

WAIT = 300

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:torch")  # inductor's imports


def load(model_dir: Path, *, compiled: bool, fuse_qkv: bool = True,
         attention_backend: str = "auto") -> LoadedModel:
    return load_pipeline(model_dir, device="cpu", use_fp16=False, memory_mode="none",
                         attention_backend=attention_backend, compile_transformer=compiled,
                         acceleration=Acceleration(), fuse_qkv=fuse_qkv)


@pytest.fixture
def lora(dev_model_dir: Path, tmp_path: Path) -> LoraInfo:
    return LoraRegistry(tmp_path / "loras").register(
        "sarah", make_dev_lora(dev_model_dir, tmp_path / "sarah.safetensors", seed=1),
        trigger_word=None, base_model="flux-tiny-dev")


def job(lora: LoraInfo | None = None, *, scale: float = 1.0, size: int = 80) -> ImageJob:
    return ImageJob(prompt="a lighthouse", negative_prompt=None, width=size, height=size,
                    steps=3, guidance=3.5, true_cfg_scale=1.0, seed=7, lora=lora,
                    lora_scale=scale)


def made(worker: GpuWorker, request: ImageJob) -> np.ndarray[Any, Any]:
    return np.asarray(worker.submit(request).result(timeout=WAIT), dtype=np.float64)


def projections(model: LoadedModel) -> list[tuple[str, Any]]:
    return [(name, module) for name, module in model.pipeline.transformer.named_modules()
            if name.endswith(("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj"))]


def stored_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct storages behind ``module``'s parameters (views count once;
    the released projections' one-element placeholders not at all)."""
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
                for p in module.parameters() if any(p.stride())}
    return sum(storages.values())


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_fused_compiled_model_gives_the_eager_pixels_with_loras_and_never_recompiles(
    dev_model_dir: Path, lora: LoraInfo, workers: list[GpuWorker],
) -> None:
    fused = load(dev_model_dir, compiled=True)
    assert fused.fused_qkv and fused.compiled and fused.attention_backend == "native"
    for name, projection in projections(fused):
        # the projection's own base weights are released: only the fused layer computes
        base = projection.get_base_layer() if hasattr(projection, "get_base_layer") \
            else projection
        weight = base.weight  # one zero seen in the weight's shape: no memory held
        assert weight.stride() == (0, 0) and weight.untyped_storage().nbytes() <= 4, name
    attentions = [module for name, module in fused.pipeline.transformer.named_modules()
                  if name.endswith(".attn")]
    assert attentions and all(isinstance(attention.to_qkv, FusedProjection)
                              for attention in attentions)
    assert isinstance(attentions[0].to_added_qkv, FusedProjection)  # the double block's text

    eager = start(workers, load(dev_model_dir, compiled=False))
    compiled = start(workers, fused)
    made(compiled, job())  # compiles, as the warm-up does
    graphs = compiled_graphs()
    requests = [job(), job(lora), job(lora, scale=0.5), job(), job(lora, size=96),
                job(lora, scale=1.5, size=96), job(size=112)]
    with torch.compiler.set_stance("fail_on_recompile"):
        ours = [made(compiled, request) for request in requests]
    assert compiled_graphs() == graphs  # LoRA, scales, base model, sizes: no new graph
    theirs = [made(eager, request) for request in requests]
    for request, mine, expected in zip(requests, ours, theirs, strict=True):
        assert np.abs(mine - expected).max() <= 2.0, request  # float noise, in 0-255 levels
    # the LoRA really acts through the fused path, and its scale with it
    assert np.abs(ours[1] - ours[0]).max() > 20
    assert np.abs(ours[2] - ours[1]).max() > 10


def test_fusion_keeps_one_copy_of_the_weights_and_fp8_quantizes_the_fused_layer_only(
    dev_model_dir: Path,
) -> None:
    plain = load(dev_model_dir, compiled=False).pipeline.transformer
    fused_model = load(dev_model_dir, compiled=True)
    transformer = fused_model.pipeline.transformer
    slot = sum(p.numel() * p.element_size() for name, p in transformer.named_parameters()
               if "lora_" in name)
    # the fused weights replace the projections' (released): same bytes, plus
    # the LoRA slot's own matrices
    assert stored_bytes(transformer) == stored_bytes(plain) + slot
    accept = quantizable(transformer)
    chosen = {name for name, module in transformer.named_modules() if accept(module, name)}
    assert {name for name in chosen if name.endswith("to_qkv.base")}
    assert {name for name in chosen if name.endswith("to_added_qkv.base")}
    assert not {name for name in chosen if name.endswith(("attn.to_q", "to_q.base_layer"))}
    assert not {name for name in chosen if "lora_" in name}
    assert {name for name in chosen if name.endswith("proj_out")}  # other layers: as before


@pytest.mark.slow
@pytest.mark.timeout(600)
# dynamo, tracing a compiled block with gradients on, reads .grad of its non-leaf inputs
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
def test_a_lora_trains_on_the_fused_compiled_model_as_on_the_unfused_one(
    dev_model_dir: Path,
) -> None:
    # training adds its own adapter beside the slot: peft places it by the projections'
    # (released) base weights, and the fused layer adds its output like the slot's
    def train(model: LoadedModel) -> tuple[float | None, dict[str, Any]]:
        pipeline = model.pipeline
        cache = encode_training_data(pipeline, to_pixels(photos(2), 64), "a photo of zqx",
                                     max_sequence_length=32)
        done = run_chunk(pipeline, cache, ChunkPlan(adapter_name="zqx_training", seed=5,
                                                    end_step=2, learning_rate=1e-3,
                                                    batch_size=1))
        return done.state.loss, done.state.weights

    fused = load(dev_model_dir, compiled=True)
    assert fused.fused_qkv
    loss, weights = train(fused)
    unfused_loss, unfused_weights = train(load(dev_model_dir, compiled=True, fuse_qkv=False))
    assert loss is not None and loss == pytest.approx(unfused_loss, rel=1e-5)
    assert weights.keys() == unfused_weights.keys()
    for key, value in weights.items():
        assert torch.allclose(value, unfused_weights[key], atol=1e-6), key


def test_an_eager_model_or_fuse_qkv_false_is_not_fused(dev_model_dir: Path) -> None:
    assert not load(dev_model_dir, compiled=False).fused_qkv
    unfused = load(dev_model_dir, compiled=True, fuse_qkv=False)
    assert unfused.compiled and not unfused.fused_qkv
    assert not any(isinstance(module, FusedProjection)
                   for module in unfused.pipeline.transformer.modules())


def test_settings_default_to_the_fast_path_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(_env_file=None)
    assert settings.fuse_qkv and settings.attention_backend == "auto"
    assert settings.compile_cache == "local"  # the shared store's blobs are opt-in (pickles)
    monkeypatch.setenv("FUSE_QKV", "false")
    assert not load_settings(_env_file=None).fuse_qkv


def test_auto_attention_picks_by_the_machine() -> None:
    # the CPU: torch's SDPA, no probing
    assert resolve_attention_backend("auto", device="cpu", dtype=torch.float32) == "native"
    assert resolve_attention_backend("_native_flash", device="cpu",
                                     dtype=torch.float32) == "_native_flash"  # as asked
    # Hopper: FA3 when installed, then cuDNN; Ampere: FlashAttention 2 when installed
    hopper = auto_candidates("cuda:0", (9, 0), {"flash_attn_interface", "flash_attn"})
    assert hopper == ["_flash_3", "_native_cudnn", "flash", "native"]
    assert auto_candidates("cuda", (9, 0), set()) == ["_native_cudnn", "native"]
    assert auto_candidates("cuda", (8, 0), {"flash_attn_interface"}) == ["native"]
    assert auto_candidates("cuda", (8, 6), {"flash_attn"}) == ["flash", "native"]
    assert auto_candidates("cuda", (10, 0), {"flash_attn_interface"}) == [
        "_native_cudnn", "native"]  # FA3 is Hopper's


def test_fp8_without_compilation_is_warned_about() -> None:
    fp8 = Acceleration(quantization="fp8")
    (warning,) = acceleration_warnings(fp8, compiled=False)
    assert "COMPILE_TRANSFORMER=true" in warning and "slower" in warning
    assert acceleration_warnings(fp8, compiled=True) == []
    assert acceleration_warnings(dataclasses.replace(fp8, quantization="none"),
                                 compiled=False) == []
