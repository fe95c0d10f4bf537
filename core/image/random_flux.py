"""A FLUX pipeline with random weights, built in memory directly on its device.

Two sizes:

- ``flux1-dev``: FLUX.1-dev's published architecture (its ``config.json`` files on the
  Hub): a 12 B-parameter transformer of 19 double and 38 single blocks, the 16-channel VAE,
  CLIP ViT-L/14's text model and T5 v1.1 XXL's encoder. Random bf16 weights make the same
  kernels run on the same shapes as the real checkpoint, so timings and memory are the real
  model's; the pictures are noise.
- ``dev``: the development model's sizes (:mod:`core.image.devmodel`), for a CPU.

Both use the development model's local tokenizers (no download); the text models keep the
real vocabulary sizes, which the tokenizers' ids stay below.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch

from core.image._devparts import (
    clip_tokenizer,
    make_clip,
    make_scheduler,
    make_t5,
    make_transformer,
    make_vae,
    t5_tokenizer,
)

__all__ = ["FLUX1_DEV_TRANSFORMER", "ModelSize", "build_random_flux", "build_random_transformer",
           "write_random_lora"]

ModelSize = Literal["flux1-dev", "dev"]

# black-forest-labs/FLUX.1-dev, transformer/config.json
FLUX1_DEV_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
    "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": (16, 56, 56),
}
# vae/config.json
_FLUX1_VAE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "act_fn": "silu",
    "latent_channels": 16, "norm_num_groups": 32, "sample_size": 1024,
    "scaling_factor": 0.3611, "shift_factor": 0.1159,
    "use_quant_conv": False, "use_post_quant_conv": False,
}
# text_encoder/config.json (openai/clip-vit-large-patch14's text model)
_FLUX1_CLIP: dict[str, Any] = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072,
    "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
    "hidden_act": "quick_gelu", "projection_dim": 768,
}
# text_encoder_2/config.json (google/t5-v1_1-xxl's encoder)
_FLUX1_T5: dict[str, Any] = {
    "vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24,
    "num_heads": 64, "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128, "feed_forward_proj": "gated-gelu",
    "layer_norm_epsilon": 1e-6, "tie_word_embeddings": False,
}
_T5_MAX_LENGTH = 512
_DEV_TEXT_DIM = 32  # core.image.devmodel's


def build_random_flux(size: ModelSize, *, device: str, dtype: torch.dtype,
                      seed: int = 0) -> Any:
    """A ``FluxPipeline`` of ``size`` with random weights, allocated on ``device`` in
    ``dtype`` (no float32 copy on the way: 12 B parameters would need 48 GB)."""
    import diffusers

    pipeline_class: Any = diffusers.FluxPipeline
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), torch.random.fork_rng(devices=[]):
            parts = _full_parts(seed) if size == "flux1-dev" else _dev_parts(seed)
            pipeline = pipeline_class(scheduler=make_scheduler(), **parts)
    finally:
        torch.set_default_dtype(previous)
    return pipeline.to(device, dtype)


def build_random_transformer(size: ModelSize, *, device: str, dtype: torch.dtype,
                             seed: int = 0) -> Any:
    """The transformer of ``build_random_flux(size, seed=seed)`` alone, with the same
    weights: a fresh one (not compiled, no adapters) for the next configuration."""
    import diffusers

    transformer_class: Any = diffusers.FluxTransformer2DModel
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), torch.random.fork_rng(devices=[]):
            transformer = (
                _seeded(seed + 3, lambda: transformer_class(**FLUX1_DEV_TRANSFORMER))
                if size == "flux1-dev" else make_transformer(seed + 3, _DEV_TEXT_DIM))
    finally:
        torch.set_default_dtype(previous)
    return transformer.to(device, dtype)


def _dev_parts(seed: int) -> dict[str, Any]:
    text_encoder, tokenizer = make_clip(seed, _DEV_TEXT_DIM)
    text_encoder_2, tokenizer_2 = make_t5(seed + 1, _DEV_TEXT_DIM, _T5_MAX_LENGTH)
    return {"vae": make_vae(seed + 2), "text_encoder": text_encoder, "tokenizer": tokenizer,
            "text_encoder_2": text_encoder_2, "tokenizer_2": tokenizer_2,
            "transformer": make_transformer(seed + 3, _DEV_TEXT_DIM)}


def _full_parts(seed: int) -> dict[str, Any]:
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tokenizer = clip_tokenizer()
    tokenizer_2 = t5_tokenizer(_T5_MAX_LENGTH)
    clip_config = CLIPTextConfig(**_FLUX1_CLIP, bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
    t5_config_class: Any = T5Config
    t5_config = t5_config_class(**_FLUX1_T5, pad_token_id=tokenizer_2.pad_token_id,
                                eos_token_id=tokenizer_2.eos_token_id,
                                decoder_start_token_id=tokenizer_2.pad_token_id)
    transformer_class: Any = diffusers.FluxTransformer2DModel
    vae_class: Any = diffusers.AutoencoderKL
    return {
        "transformer": _seeded(seed + 3, lambda: transformer_class(**FLUX1_DEV_TRANSFORMER)),
        "vae": _seeded(seed + 2, lambda: vae_class(**_FLUX1_VAE)),
        "text_encoder": _seeded(seed, lambda: CLIPTextModel(clip_config)),
        "tokenizer": tokenizer,
        "text_encoder_2": _seeded(seed + 1, lambda: T5EncoderModel(t5_config)),
        "tokenizer_2": tokenizer_2,
    }


def _seeded(seed: int, build: Callable[[], Any]) -> Any:
    torch.manual_seed(seed)
    return build().eval()


_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")


def write_random_lora(transformer: Any, out_file: Any, *, rank: int = 16, seed: int = 0,
                      scale: float = 0.01) -> Any:
    """Write a random rank-``rank`` LoRA for ``transformer`` (any size) on
    ``to_q/k/v/out.0`` to ``out_file`` (``.safetensors``), drawing the matrices on the
    transformer's device, without a copy of the model."""
    import diffusers

    generator = torch.Generator(transformer.device).manual_seed(seed)
    layers: dict[str, torch.Tensor] = {}
    for name, module in transformer.named_modules():
        if not (isinstance(module, torch.nn.Linear) and name.endswith(_LORA_TARGETS)):
            continue
        for part, shape in (("lora_A", (rank, module.in_features)),
                            ("lora_B", (module.out_features, rank))):
            layers[f"{name}.{part}.weight"] = (torch.randn(
                shape, generator=generator, device=transformer.device) * scale).to(
                transformer.dtype).contiguous()
    metadata = {"r": rank, "lora_alpha": rank, "target_modules": sorted(_LORA_TARGETS)}
    pipeline_class: Any = diffusers.FluxPipeline
    pipeline_class.save_lora_weights(out_file.parent, transformer_lora_layers=layers,
                                     weight_name=out_file.name,
                                     transformer_lora_adapter_metadata=metadata)
    return out_file
