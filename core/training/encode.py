"""The training data, encoded once: VAE latent distributions and the caption's embeddings.

Runs in the GPU worker thread (an exclusive call) at the start of a training; the result
lives on the CPU between chunks and on disk beside the checkpoints, so a resumed training
does not encode again. Per image the latent distribution's mean and standard deviation are
kept (already shifted and scaled as FLUX's VAE config says), and each step samples from it,
as diffusers' script does with ``--cache_latents``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from core.training.objective import TextCache

__all__ = ["TrainingCache", "encode_training_data"]

_VAE_BATCH = 4  # images per VAE call: bounds the activation memory of 50 images at 1024²


@dataclass(frozen=True)
class TrainingCache:
    """``latent_mean``/``latent_std``: (N, 16, R/8, R/8) float32 on the CPU; ``text``:
    the caption's embeddings, float32 on the CPU."""

    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    text: TextCache

    @property
    def image_count(self) -> int:
        return int(self.latent_mean.shape[0])

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat name → tensor map, for safetensors."""
        return {"latent_mean": self.latent_mean, "latent_std": self.latent_std,
                "prompt_embeds": self.text.prompt_embeds, "pooled": self.text.pooled,
                "text_ids": self.text.text_ids}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> TrainingCache:
        """The inverse of :meth:`tensors`; raises ``KeyError`` when one is missing."""
        return cls(tensors["latent_mean"], tensors["latent_std"], TextCache(
            tensors["prompt_embeds"], tensors["pooled"], tensors["text_ids"]))


def encode_training_data(
    pipeline: Any, pixels: torch.Tensor, caption: str, *, max_sequence_length: int
) -> TrainingCache:
    """Encode ``pixels`` ((N, 3, R, R) in [-1, 1]) with the pipeline's VAE and ``caption``
    with its two text encoders, without gradients. Call it in the GPU worker thread."""
    vae = pipeline.vae
    device = pipeline._execution_device
    shift = float(vae.config.shift_factor or 0.0)
    scale = float(vae.config.scaling_factor)
    means: list[torch.Tensor] = []
    stds: list[torch.Tensor] = []
    with torch.no_grad():
        for start in range(0, pixels.shape[0], _VAE_BATCH):
            batch = pixels[start:start + _VAE_BATCH]
            dist = vae.encode(batch.to(device, vae.dtype)).latent_dist
            means.append(((dist.mean - shift) * scale).float().cpu())
            stds.append((dist.std * scale).float().cpu())
        prompt_embeds, pooled, text_ids = pipeline.encode_prompt(
            prompt=caption, prompt_2=caption, device=device,
            max_sequence_length=max_sequence_length)
    return TrainingCache(
        latent_mean=torch.cat(means), latent_std=torch.cat(stds),
        text=TextCache(prompt_embeds.float().cpu(), pooled.float().cpu(),
                       text_ids.float().cpu()),
    )
