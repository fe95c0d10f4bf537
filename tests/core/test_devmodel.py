"""The tiny development model and the loader: deterministic, loadable offline, and clear
errors for folders and settings that cannot work."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from core.image import (
    DEV_MODEL_NAME,
    DevModelError,
    LoadedModel,
    ModelLoadError,
    build_dev_model,
)
from core.image import load_pipeline as load
from core.image.devmodel import make_dev_lora
from core.lora.metadata import PORTABLE_FIELDS


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_dev_model(tmp_path_factory.mktemp("model") / "flux-dev", seed=0)


def digests(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*")) if path.is_file()
    }


def load_cpu(path: Path, **changes: Any) -> LoadedModel:
    options: dict[str, Any] = {"device": "cpu", "use_fp16": False, "memory_mode": "none",
                               "attention_backend": "native", "compile_transformer": False}
    options.update(changes)
    return load(path, **options)


def test_same_seed_gives_identical_files(model_dir: Path, tmp_path: Path) -> None:
    again = build_dev_model(tmp_path / "again", seed=0)
    other = build_dev_model(tmp_path / "other", seed=1)
    assert digests(again) == digests(model_dir)
    weights = "transformer/diffusion_pytorch_model.safetensors"
    assert digests(other)[weights] != digests(model_dir)[weights]
    marker = json.loads((model_dir / "dev_model.json").read_text())
    assert marker["development_model"] is True and marker["name"] == DEV_MODEL_NAME
    assert marker["seed"] == 0


def test_a_complete_folder_is_reused_and_another_seed_rebuilt(tmp_path: Path) -> None:
    folder = build_dev_model(tmp_path / "m", seed=3)
    stamp = (folder / "model_index.json").stat().st_mtime_ns
    assert build_dev_model(folder, seed=3) == folder
    assert (folder / "model_index.json").stat().st_mtime_ns == stamp
    build_dev_model(folder, seed=4)
    assert json.loads((folder / "dev_model.json").read_text())["seed"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no staging folder left


def test_a_foreign_folder_is_never_overwritten(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(DevModelError, match="refusing"):
        build_dev_model(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_loads_offline_with_diffusers_and_generates(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import diffusers

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipeline_class: Any = diffusers.FluxPipeline
    pipe = pipeline_class.from_pretrained(model_dir, local_files_only=True)
    assert pipe.vae_scale_factor == 8 and pipe.tokenizer.model_max_length == 77
    assert pipe.vae.config.latent_channels == 16 and pipe.vae.config.scaling_factor == 0.3611
    assert pipe.scheduler.config.use_dynamic_shifting
    assert pipe.text_encoder.config.eos_token_id == pipe.tokenizer.eos_token_id
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a cat", height=32, width=48, num_inference_steps=2, max_sequence_length=16,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (48, 32)


def test_loader_reports_the_development_model(model_dir: Path) -> None:
    model = load_cpu(model_dir)
    assert model.development_model and model.name == DEV_MODEL_NAME
    assert model.device == "cpu" and model.dtype == torch.float32
    assert not model.compiled


def test_loader_names_what_a_folder_lacks(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="model_index.json") as caught:
        load_cpu(tmp_path)
    assert caught.value.path == tmp_path
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_cpu(tmp_path / "nowhere")

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    shutil.rmtree(broken / "tokenizer_2")
    with pytest.raises(ModelLoadError) as caught:
        load_cpu(broken)
    assert caught.value.missing == ("tokenizer_2/", "vae/ weights (*.safetensors)")
    assert "tokenizer_2/" in str(caught.value) and "vae/" in str(caught.value)


@pytest.mark.parametrize("mode", ["model_offload", "sequential_offload"])
def test_offloading_without_a_gpu_is_a_clear_error(model_dir: Path, mode: str) -> None:
    with pytest.raises(ModelLoadError, match="MEMORY_MODE") as caught:
        load_cpu(model_dir, memory_mode=mode)
    assert caught.value.setting == "MEMORY_MODE"


@pytest.mark.parametrize(("backend", "words"), [
    ("nonsense", "unknown"), ("flash_hub", "offline"), ("xformers", "not installed"),
])
def test_unusable_attention_backends_are_clear_errors(
    model_dir: Path, backend: str, words: str
) -> None:
    if backend == "xformers":
        import importlib.util

        if importlib.util.find_spec("xformers") is not None:
            pytest.skip("xformers is installed here")
    with pytest.raises(ModelLoadError, match="ATTENTION_BACKEND") as caught:
        load_cpu(model_dir, attention_backend=backend)
    assert words in str(caught.value) and caught.value.setting == "ATTENTION_BACKEND"


def test_cuda_requested_without_cuda_is_a_clear_error(model_dir: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ModelLoadError, match="DEVICE"):
        load_cpu(model_dir, device="cuda")


def test_dev_lora_is_rank_16_on_the_attention_projections(model_dir: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    path = make_dev_lora(model_dir, tmp_path / "l.safetensors", seed=5)
    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
        metadata = json.loads(handle.metadata()["lora_adapter_metadata"])
        b_weights = [handle.get_tensor(k) for k in keys if "lora_B" in k]
    assert metadata["transformer.r"] == 16 and metadata["transformer.lora_alpha"] == 16
    assert metadata["transformer.target_modules"] == ["to_k", "to_out.0", "to_q", "to_v"]
    assert {name.removeprefix("transformer.") for name in metadata} <= set(PORTABLE_FIELDS)
    assert {k.split(".")[-3] for k in keys} >= {"to_k", "to_q", "to_v"}
    assert all(weight.abs().sum() > 0 for weight in b_weights)  # not a no-op
