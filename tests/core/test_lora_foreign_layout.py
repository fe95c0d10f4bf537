"""A LoRA in another trainer's layout (kohya's here) is read and converted once per load:
the fit check hands diffusers the tensors it has already converted, instead of the file
for diffusers to read and convert again. The image is the one the same weights give in
diffusers' own layout, which is checked from its header alone and read once by the load.
Both LoRA modes (eager LRU set, hotswap slot). Tiny development model on the CPU."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from safetensors.torch import save_file

from core.image import GpuWorker, LoadedModel, build_dev_model
from core.lora import LoraRegistry
from tests.core.conftest import start_worker
from tests.core.test_lora_fit import eager_model, image, slot_model

RANK, ALPHA, WIDTH = 4, 2.0, 32  # the development model's inner dimension is 32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_dev_model(tmp_path_factory.mktemp("model") / "flux-dev", seed=0)


def kohya_lora(path: Path) -> Path:
    """sd-scripts' layout for FLUX: the first double block's image attention (fused qkv,
    projection), with an alpha that the conversion folds into the matrices."""
    generator = torch.Generator().manual_seed(11)
    tensors: dict[str, torch.Tensor] = {}
    for module, outputs in (("qkv", 3 * WIDTH), ("proj", WIDTH)):
        key = f"lora_unet_double_blocks_0_img_attn_{module}"
        tensors[f"{key}.lora_down.weight"] = torch.randn(RANK, WIDTH, generator=generator)
        tensors[f"{key}.lora_up.weight"] = torch.randn(outputs, RANK, generator=generator)
        tensors[f"{key}.alpha"] = torch.tensor(ALPHA)
    save_file(tensors, str(path))
    return path


def diffusers_twin(kohya: Path, path: Path) -> Path:
    """The same weights in diffusers' layout, as diffusers converts them."""
    from diffusers import FluxPipeline

    converted = FluxPipeline.lora_state_dict(str(kohya))
    save_file({key: value.clone().contiguous() for key, value in converted.items()},
              str(path))
    return path


@pytest.fixture
def registry(tmp_path: Path) -> LoraRegistry:
    registry = LoraRegistry(tmp_path / "loras")
    kohya = kohya_lora(tmp_path / "kohya.safetensors")
    twin = diffusers_twin(kohya, tmp_path / "twin.safetensors")
    for lora_id, source in (("kohya", kohya), ("twin", twin)):
        registry.register(lora_id, source, trigger_word=None, base_model="flux-tiny-dev")
    return registry


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """How often each safetensors file's tensors were read (by name), from now on: every
    reader (ours, diffusers') goes through ``safetensors.torch.load_file``."""
    counted: Counter[str] = Counter()
    real = safetensors.torch.load_file

    def load_file(filename: str | Path, device: str | int = "cpu") -> dict[str, torch.Tensor]:
        counted[Path(filename).name] += 1
        return real(filename, device=device)

    monkeypatch.setattr(safetensors.torch, "load_file", load_file)
    return counted


@pytest.fixture
def start(workers: list[GpuWorker]) -> Callable[[LoadedModel], GpuWorker]:
    return lambda model: start_worker(workers, model, lora_cache_size=4)


@pytest.mark.parametrize("mode", ["eager", "hotswap"])
async def test_a_foreign_layout_lora_is_read_once_per_load_and_draws_the_same_image(
    mode: str, model_dir: Path, registry: LoraRegistry, reads: Counter[str],
    start: Callable[[LoadedModel], GpuWorker],
) -> None:
    worker = start(eager_model(model_dir) if mode == "eager" else slot_model(model_dir))
    base = await image(worker)
    reads.clear()  # the model's own files are no LoRA's

    foreign = await image(worker, registry.get("kohya"))
    assert reads == {"kohya.safetensors": 1}  # checked and loaded from one read
    twin = await image(worker, registry.get("twin"))
    assert reads == {"kohya.safetensors": 1, "twin.safetensors": 1}  # checked by its header

    assert np.abs(foreign - base).mean() > 0.5  # the LoRA does something
    assert np.array_equal(foreign, twin)  # and exactly what diffusers makes of the file
