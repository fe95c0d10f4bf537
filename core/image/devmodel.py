"""The tiny development model: the real FLUX.1 architecture with random weights.

:func:`build_dev_model` writes a complete ``FluxPipeline`` folder (transformer, FLUX's VAE,
CLIP and T5 text encoders with locally made tokenizers, FLUX.1-dev's scheduler) that
``FluxPipeline.from_pretrained`` loads offline. Everything is built on this machine in well
under a second, deterministically: the same seed gives byte-identical files. Tests, ``dev``
and benchmarks run the very same pipeline code on it, on a CPU.

:func:`make_dev_lora` writes a small random LoRA for that model (for tests and ``dev``'s
example character).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from core.image._fresh_thread import run_in_fresh_thread
from core.lora.metadata import portable_metadata

__all__ = [
    "DEV_MODEL_MARKER",
    "DEV_MODEL_NAME",
    "DevModelError",
    "build_dev_model",
    "make_dev_lora",
    "read_dev_marker",
]

logger = logging.getLogger(__name__)

DEV_MODEL_MARKER = "dev_model.json"
DEV_MODEL_NAME = "flux-tiny-dev"
# Bump when anything below changes what is written: a cached folder of another recipe is
# rebuilt instead of being trusted.
_RECIPE = 1

_TEXT_DIM = 32  # CLIP hidden size = pooled_projection_dim; T5 d_model = joint_attention_dim
_T5_MAX_LENGTH = 512  # FLUX.1-dev's T5 limit; the pipeline refuses more
_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")


class DevModelError(Exception):
    """The development model cannot be written where it was asked to be."""


def read_dev_marker(directory: Path) -> dict[str, Any] | None:
    """The marker of a development-model folder, or None when ``directory`` holds none
    (a real model) or an unreadable one."""
    try:
        data = json.loads((directory / DEV_MODEL_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("development_model") is True else None


def build_dev_model(directory: Path, seed: int = 0) -> Path:
    """Write the tiny FLUX pipeline into ``directory`` (created) and return it.

    A folder that already holds a complete development model of this recipe and ``seed``
    is reused as is. The build goes to a temporary sibling folder that is renamed into
    place, so a concurrent reader never sees half a model. Raises :class:`DevModelError`
    when ``directory`` exists and holds anything else than a development model (it is
    never deleted).
    """
    directory = Path(directory)
    if _is_complete(directory, seed):
        return directory
    if directory.exists() and any(directory.iterdir()) and read_dev_marker(directory) is None:
        raise DevModelError(
            f"{directory} is not empty and holds no development model; refusing to overwrite it"
        )
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.parent / f".{directory.name}.building-{uuid.uuid4().hex[:8]}"
    try:
        run_in_fresh_thread(lambda: _build_pipeline(seed).save_pretrained(
            staging, safe_serialization=True))
        marker = {"development_model": True, "name": DEV_MODEL_NAME, "seed": seed,
                  "recipe": _RECIPE}
        (staging / DEV_MODEL_MARKER).write_text(json.dumps(marker, indent=2) + "\n", "utf-8")
        if directory.exists():
            # an empty folder, or a stale development model (other recipe or seed)
            shutil.rmtree(directory)
        os.replace(staging, directory)
    except OSError as exc:
        if _is_complete(directory, seed):  # another process won the race: same content
            return directory
        raise DevModelError(f"cannot write the development model to {directory}: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("built development model %s (seed %d) in %s", DEV_MODEL_NAME, seed, directory)
    return directory


def _is_complete(directory: Path, seed: int) -> bool:
    marker = read_dev_marker(directory)
    if marker is None or marker.get("recipe") != _RECIPE or marker.get("seed") != seed:
        return False
    from core.image._layout import missing_parts

    return not missing_parts(directory)


def _build_pipeline(seed: int) -> Any:
    import diffusers

    from core.image._devparts import make_clip, make_scheduler, make_t5, make_transformer, make_vae

    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG as it was
        text_encoder, tokenizer = make_clip(seed, _TEXT_DIM)
        text_encoder_2, tokenizer_2 = make_t5(seed + 1, _TEXT_DIM, _T5_MAX_LENGTH)
        pipeline_class: Any = diffusers.FluxPipeline
        return pipeline_class(
            scheduler=make_scheduler(),
            vae=make_vae(seed + 2),
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            transformer=make_transformer(seed + 3, _TEXT_DIM),
        )


def make_dev_lora(
    model: Any, out_file: Path, *, rank: int = 16, alpha: int | None = None, seed: int = 0,
    scale: float = 0.5,
) -> Path:
    """Write a random LoRA for the development model to ``out_file`` (a ``.safetensors``).

    ``model`` is a loaded ``FluxPipeline`` or the folder of one. The adapter is peft rank
    ``rank`` on ``to_k, to_q, to_v, to_out.0`` of the transformer with *non-zero* B
    matrices (a freshly initialised LoRA is a no-op), drawn from ``seed``; ``scale`` sets
    the size of the change it makes. It is saved with ``FluxPipeline.save_lora_weights``
    including its adapter metadata (rank, alpha, targets). The model given is not
    modified. Raises ``OSError`` when the file cannot be written.
    """
    return run_in_fresh_thread(lambda: _make_lora(model, Path(out_file), rank, alpha, seed, scale))


def _make_lora(model: Any, out_file: Path, rank: int, alpha: int | None, seed: int,
               scale: float) -> Path:
    import diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    model_class: Any = diffusers.FluxTransformer2DModel
    if isinstance(model, (str, Path)):
        transformer = model_class.from_pretrained(
            Path(model) / "transformer", local_files_only=True
        )
    else:
        with torch.random.fork_rng(devices=[]):
            transformer = model_class.from_config(model.transformer.config)
    config: Any = LoraConfig(r=rank, lora_alpha=alpha or rank,
                             target_modules=list(_LORA_TARGETS), init_lora_weights=True)
    transformer.add_adapter(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    layers = get_peft_model_state_dict(transformer)
    metadata = portable_metadata(config)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    diffusers.FluxPipeline.save_lora_weights(
        out_file.parent,
        transformer_lora_layers=layers,
        weight_name=out_file.name,
        transformer_lora_adapter_metadata=metadata,
    )
    return out_file
