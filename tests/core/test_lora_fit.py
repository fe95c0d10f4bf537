"""A LoRA not made for this model is refused before it is loaded, and the model stays exactly
as it was: the request that named it fails ``INVALID_REQUEST`` naming its field and the LoRA,
and every later request (base model, other LoRAs) gets the pixels it got before. diffusers
would otherwise widen the model's layers to the LoRA's sizes (its Control-LoRA support) and
every later image failed until a restart. Both LoRA modes: the eager LRU set and the
hotswap slot of a compiled model. Registration refuses files whose tensors are no plain
LoRA layers. Tiny development model on the CPU, 64 px, 2 steps."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from core.image import GpuWorker, ImageJob, LoadedModel, build_dev_model, load_pipeline
from core.image.devmodel import make_dev_lora
from core.image.params import ImageLimits
from core.image.prompts import PromptOptimizer
from core.image.results import ResultCache
from core.image.service import ImageService, ModelIdentity
from core.lora import LoraInfo, LoraRegistry
from core.lora.adapters import HOTSWAP_SLOT, IncompatibleLoraError, prepare_hotswap_slot
from core.outputs import OutputStore
from core.remembered import RememberedResults
from schemas.errors import ErrorCode, InvalidRequestError
from schemas.events import ImageRequested

WAIT = 60.0  # seconds; a bound for any image on a busy CPU, never a sleep
STEPS = 2

Tensors = dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_dev_model(tmp_path_factory.mktemp("model") / "flux-dev", seed=0)


@pytest.fixture(scope="module")
def good_tensors(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Tensors:
    made = make_dev_lora(model_dir, tmp_path_factory.mktemp("made") / "good.safetensors",
                         seed=5)
    return load_file(str(made))


def wider(tensors: Tensors, extra: int = 8) -> Tensors:
    """The same LoRA with ``lora_A`` matrices ``extra`` inputs wider: made for a model
    whose layers take more inputs."""
    return {key: torch.randn(value.shape[0], value.shape[1] + extra)
            if ".lora_A." in key else value for key, value in tensors.items()}


def elsewhere(tensors: Tensors) -> Tensors:
    """The same LoRA on layers this model does not have."""
    return {key.replace(".attn.", ".nothere."): value for key, value in tensors.items()}


@pytest.fixture
def registry(model_dir: Path, good_tensors: Tensors, tmp_path: Path) -> LoraRegistry:
    registry = LoraRegistry(tmp_path / "loras")
    for name, tensors in (("good", good_tensors), ("wide", wider(good_tensors)),
                          ("nowhere", elsewhere(good_tensors))):
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
        registry.register(name, tmp_path / f"{name}.safetensors", trigger_word=None,
                          base_model="flux-tiny-dev")
    return registry


def eager_model(model_dir: Path) -> LoadedModel:
    return load_pipeline(model_dir, device="cpu", use_fp16=False, memory_mode="none",
                         attention_backend="native", compile_transformer=False)


def slot_model(model_dir: Path) -> LoadedModel:
    """A model with the compiled model's hotswap slot, prepared as the loader prepares it
    before compiling; not compiled (30 s on this CPU), which the slot does not need."""
    model = eager_model(model_dir)
    prepare_hotswap_slot(model.pipeline)
    return replace(model, compiled=True, hotswap_slot=HOTSWAP_SLOT)


@pytest.fixture
def start() -> Iterator[Callable[[LoadedModel], GpuWorker]]:
    started: list[GpuWorker] = []

    def make(model: LoadedModel) -> GpuWorker:
        worker = GpuWorker(model, max_batch_size=4, batch_window_ms=0, lora_cache_size=4,
                           vae_tiling_threshold=1536, max_sequence_length=32)
        worker.start()
        started.append(worker)
        return worker

    yield make
    for worker in started:
        worker.stop(timeout=WAIT)


def service_on(worker: GpuWorker, registry: LoraRegistry, tmp_path: Path) -> ImageService:
    return ImageService(
        worker, registry, OutputStore(tmp_path / "outputs"), PromptOptimizer(None),
        ResultCache(RememberedResults(tmp_path / "outputs" / ".results")),
        ImageLimits(max_image_size=256, default_steps=STEPS, default_size=64),
        ModelIdentity("flux-tiny-dev", True, "tiny"), progress_interval=0.0)


def request(**fields: object) -> ImageRequested:
    return ImageRequested.model_validate(
        {"request_id": "r-1", "conversation_id": "c", "prompt": "a park", "width": 64,
         "height": 64, "num_inference_steps": STEPS, "optimize_prompt": False, "seed": 3,
         **fields})


async def image(worker: GpuWorker, lora: LoraInfo | None = None, seed: int = 3
                ) -> np.ndarray:
    """An image straight from the worker (no result cache in between)."""
    made = await worker.generate(ImageJob(
        prompt="a park", negative_prompt=None, width=64, height=64, steps=STEPS,
        guidance=3.5, true_cfg_scale=1.0, seed=seed, lora=lora))
    return np.asarray(made).astype(np.int16)


@pytest.mark.parametrize("mode", ["eager", "hotswap"])
async def test_a_lora_made_for_another_model_is_refused_and_the_model_stays_as_it_was(
    mode: str, model_dir: Path, registry: LoraRegistry, tmp_path: Path,
    start: Callable[[LoadedModel], GpuWorker],
) -> None:
    worker = start(eager_model(model_dir) if mode == "eager" else slot_model(model_dir))
    service = service_on(worker, registry, tmp_path)
    good = registry.get("good")
    base_before, good_before = await image(worker), await image(worker, good)
    assert np.abs(good_before - base_before).mean() > 1.0  # the LoRA does something

    for lora_id, why in (("wide", "takes 40 inputs, the layer 32"),
                         ("nowhere", "which is no linear layer of this model")):
        with pytest.raises(IncompatibleLoraError) as refused:
            await service.generate(request(character_lora_id=lora_id))
        error = refused.value
        assert (error.code, error.retryable) == (ErrorCode.INVALID_REQUEST, False)
        assert isinstance(error, InvalidRequestError) and error.field == "character_lora_id"
        assert f"LoRA {lora_id!r} was not made for this model" in error.public_message
        assert why in error.message

    # the model is the one it was: the base model and the good LoRA, bit for bit
    assert np.array_equal(await image(worker), base_before)
    assert np.array_equal(await image(worker, good), good_before)
    assert np.array_equal(await image(worker), base_before)
    made = await service.generate(request(character_lora_id="good", seed=4))
    assert made.filename and worker.loaded_loras == ["good"]


async def test_a_stacked_lora_that_does_not_fit_is_named_by_its_field_and_loads_nothing(
    model_dir: Path, registry: LoraRegistry, tmp_path: Path,
    start: Callable[[LoadedModel], GpuWorker],
) -> None:
    worker = start(eager_model(model_dir))
    service = service_on(worker, registry, tmp_path)
    with pytest.raises(IncompatibleLoraError) as refused:
        await service.generate(request(character_lora_id="good",
                                       loras=[{"lora_id": "wide", "scale": 0.5}]))
    assert refused.value.field == "loras.0.lora_id" and refused.value.lora_id == "wide"
    assert refused.value.message.startswith("loras.0.lora_id: LoRA 'wide' ")
    assert worker.loaded_loras == []  # checked all before loading any


async def test_a_lora_dropped_in_without_registration_is_checked_too(
    model_dir: Path, good_tensors: Tensors, registry: LoraRegistry, tmp_path: Path,
    start: Callable[[LoadedModel], GpuWorker],
) -> None:
    # a Control LoRA's extra norm layers: the registry would refuse it, so it is copied
    # in by hand (the registry serves a weights file without its JSON)
    control = dict(good_tensors)
    control["transformer.transformer_blocks.0.attn.norm_k.weight"] = torch.ones(16)
    save_file(control, str(registry.directory / "control.safetensors"))
    worker = start(eager_model(model_dir))
    with pytest.raises(IncompatibleLoraError, match="no LoRA matrices") as refused:
        await service_on(worker, registry, tmp_path).generate(
            request(character_lora_id="control"))
    assert "transformer.transformer_blocks.0.attn.norm_k.weight" in refused.value.message
    assert worker.loaded_loras == []


def test_registration_refuses_tensors_that_are_no_plain_lora_layers(
    good_tensors: Tensors, tmp_path: Path
) -> None:
    registry = LoraRegistry(tmp_path / "loras")
    a_key = next(key for key in good_tensors if ".lora_A." in key)
    b_key = a_key.replace(".lora_A.", ".lora_B.")
    cases = {
        "unpaired": ({k: v for k, v in good_tensors.items() if k != b_key},
                     "has lora_A without lora_B"),
        "ranks": ({**good_tensors, b_key: torch.zeros(good_tensors[b_key].shape[0], 8)},
                  "are not the two matrices of one rank"),
        "control": ({**good_tensors,
                     "transformer.transformer_blocks.0.attn.norm_k.weight": torch.ones(16)},
                    "no LoRA matrices diffusers loads as such"),
        "unprefixed": ({k.removeprefix("transformer."): v for k, v in good_tensors.items()},
                       "no LoRA matrices diffusers loads as such"),
    }
    for name, (tensors, why) in cases.items():
        source = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(source))
        with pytest.raises(ValueError, match=why):
            registry.register(name, source, trigger_word=None, base_model=None)
        assert not (registry.directory / f"{name}.safetensors").exists()
    # sizes are not the registry's business: it knows no model (the load checks them)
    save_file(wider(good_tensors), str(tmp_path / "wide.safetensors"))
    assert registry.register("wide", tmp_path / "wide.safetensors", trigger_word=None,
                             base_model=None).rank == 16

