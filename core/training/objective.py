"""FLUX's flow-matching objective, as in diffusers' ``train_dreambooth_lora_flux.py``.

For clean latents ``x`` (VAE latents, shifted and scaled), noise ``ε`` and a noise level
``σ`` in (0, 1]: the model sees ``(1 − σ)·x + σ·ε`` (packed into 2×2 patches, as the
pipeline does) at timestep ``σ`` with the distilled guidance embedding, and is asked for
the velocity ``ε − x``. The loss is the mean squared error in float32. Packing the target
instead of unpacking the prediction gives the same mean (it is a permutation).

σ is drawn uniformly from the scheduler's training grid ``{1/1000, …, 1000/1000}`` (the
script's default weighting scheme "none": no loss weighting). Everything random comes from
one explicit ``torch.Generator`` on the CPU, so a run is reproducible from its state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["NUM_TRAIN_TIMESTEPS", "TextCache", "flow_matching_loss", "sample_sigmas"]

NUM_TRAIN_TIMESTEPS = 1000  # FLUX.1-dev's scheduler config


@dataclass(frozen=True)
class TextCache:
    """The caption's embeddings, computed once: T5 ``prompt_embeds`` (1, L, D), CLIP
    ``pooled`` (1, P) and FLUX's ``text_ids`` (L, 3)."""

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    text_ids: torch.Tensor

    def to(self, device: torch.device | str, dtype: torch.dtype) -> TextCache:
        return TextCache(self.prompt_embeds.to(device, dtype), self.pooled.to(device, dtype),
                         self.text_ids.to(device, dtype))


def sample_sigmas(batch: int, generator: torch.Generator) -> torch.Tensor:
    """``batch`` noise levels from the training grid, drawn with ``generator`` (CPU)."""
    indices = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch,), generator=generator)
    return (NUM_TRAIN_TIMESTEPS - indices).to(torch.float32) / NUM_TRAIN_TIMESTEPS


def flow_matching_loss(
    forward: Callable[..., Any],
    latents: torch.Tensor,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    text: TextCache,
    *,
    guidance: float | None,
) -> torch.Tensor:
    """The loss of ``forward`` (the FLUX transformer, or its uncompiled ``forward``) on
    ``latents`` (B, C, H, W) with ``noise`` like them and ``sigmas`` (B,), all on the
    transformer's device and dtype. ``guidance`` is None for a model without the guidance
    embedding. Returns a float32 scalar that carries the graph (when grad is enabled)."""
    from diffusers import FluxPipeline

    batch, channels, height, width = latents.shape
    s = sigmas.to(latents.device, latents.dtype).view(batch, 1, 1, 1)
    noisy = (1.0 - s) * latents + s * noise
    packed = FluxPipeline._pack_latents(noisy, batch, channels, height, width)
    target = FluxPipeline._pack_latents(noise - latents, batch, channels, height, width)
    image_ids = FluxPipeline._prepare_latent_image_ids(
        batch, height // 2, width // 2, latents.device, latents.dtype)
    guidance_tensor = (
        torch.full((batch,), guidance, device=latents.device, dtype=torch.float32)
        if guidance is not None else None
    )
    prediction = forward(
        hidden_states=packed,
        timestep=sigmas.to(latents.device, latents.dtype),  # the pipeline's t / 1000
        guidance=guidance_tensor,
        pooled_projections=text.pooled.expand(batch, -1),
        encoder_hidden_states=text.prompt_embeds.expand(batch, -1, -1),
        txt_ids=text.text_ids,
        img_ids=image_ids,
        return_dict=False,
    )[0]
    return torch.mean((prediction.float() - target.float()) ** 2)
