"""The components of the tiny development model, each built from a fixed config and seed.

Sizes obey FLUX's constraints: transformer ``in_channels`` = 4 × VAE ``latent_channels``;
``joint_attention_dim`` = T5 ``d_model``; ``pooled_projection_dim`` = CLIP ``hidden_size``;
``axes_dims_rope`` sums to ``attention_head_dim``; four VAE blocks give ``vae_scale_factor``
8, as in the real model. Models come out in ``eval()`` mode (no dropout).
"""

from __future__ import annotations

import string
from typing import Any

import torch

_LATENT_CHANNELS = 16  # FLUX's VAE
_CLIP_MAX_LENGTH = 77  # FluxPipeline pads CLIP to model_max_length; more overflows


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


def make_transformer(seed: int, text_dim: int) -> Any:
    import diffusers

    model_class: Any = diffusers.FluxTransformer2DModel
    _seeded(seed)
    return model_class(
        patch_size=1,
        in_channels=4 * _LATENT_CHANNELS,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=text_dim,
        pooled_projection_dim=text_dim,
        guidance_embeds=True,  # FLUX.1-dev: distilled guidance fed as an embedding
        axes_dims_rope=(4, 6, 6),
    ).eval()


def make_vae(seed: int) -> Any:
    import diffusers

    model_class: Any = diffusers.AutoencoderKL
    _seeded(seed)
    return model_class(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=_LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()


def make_scheduler() -> Any:
    import diffusers

    scheduler_class: Any = diffusers.FlowMatchEulerDiscreteScheduler
    # FLUX.1-dev's scheduler config
    return scheduler_class(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable characters."""
    visible = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = visible[:]
    extra = 0
    for byte in range(256):
        if byte not in visible:
            visible.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {byte: chr(code) for byte, code in zip(visible, codes)}


def clip_tokenizer() -> Any:
    """A byte-level BPE CLIP tokenizer: every byte, alone and word-final."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    pieces = chars + [c + "</w>" for c in chars]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    vocab[bos] = len(vocab)
    vocab[eos] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=_CLIP_MAX_LENGTH)


def make_clip(seed: int, hidden: int) -> tuple[Any, Any]:
    """:func:`clip_tokenizer` and a text model whose ``eos_token_id`` is the tokenizer's
    (the pooled output looks for it)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = clip_tokenizer()
    vocab = tokenizer.get_vocab()
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=_CLIP_MAX_LENGTH,
        projection_dim=hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    _seeded(seed)
    model: Any = CLIPTextModel(config)
    return model.eval(), tokenizer


def t5_tokenizer(max_length: int) -> Any:
    """A Unigram T5 tokenizer made from a vocab list (printable ASCII pieces, alone and
    word-initial)."""
    from transformers import T5Tokenizer

    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    chars = [c for c in string.printable if not c.isspace()]
    pieces = [(c, -3.0) for c in chars] + [("▁" + c, -2.5) for c in chars]
    return T5Tokenizer(vocab=specials + pieces, extra_ids=0, model_max_length=max_length)


def make_t5(seed: int, d_model: int, max_length: int) -> tuple[Any, Any]:
    """:func:`t5_tokenizer` and a one-layer T5 encoder."""
    from transformers import T5Config, T5EncoderModel

    tokenizer = t5_tokenizer(max_length)
    config_class: Any = T5Config  # its stub lacks decoder_start_token_id
    config = config_class(
        vocab_size=len(tokenizer.get_vocab()),
        d_model=d_model,
        d_ff=37,
        d_kv=8,
        num_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    _seeded(seed)
    model: Any = T5EncoderModel(config)
    return model.eval(), tokenizer
