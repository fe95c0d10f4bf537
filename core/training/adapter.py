"""The training adapter, attached to the shared pipeline's transformer for one chunk.

The pipeline belongs to the GPU worker and serves image requests between training chunks,
so a chunk must leave it exactly as it found it. The adapter's weights are float32 whatever
the transformer's dtype (bfloat16 on CUDA): AdamW's small updates would vanish in bf16's
8-bit mantissa; the forward casts them under autocast. :func:`attached_adapter` adds the LoRA
under its own adapter name, makes it the only trainable thing, and on the way out
(success or error) removes it and restores what it changed:

- the adapter itself: when the transformer held no adapters before, ``unload_lora()``
  removes peft's wrapper layers too, giving back the original modules (the base model's
  bit-exact outputs); otherwise only this adapter is deleted, the previously active
  adapters are set again and a disabled set stays disabled (the registry's LoRAs, loaded
  by the worker's :class:`~core.lora.adapters.AdapterSet`, keep working);
- ``requires_grad`` of every parameter, train/eval mode and gradient checkpointing.

Training a separate copy of the transformer would isolate it completely, but for FLUX.1
that copy is 22 GiB of GPU memory; the add/remove costs milliseconds on the tiny model and
about a second on FLUX.1, once per chunk.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "LORA_ALPHA", "LORA_RANK", "LORA_TARGETS", "adapter_weights", "attached_adapter",
    "lora_config",
]

LORA_RANK = 16
LORA_ALPHA = 16
LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
_MULTIPLE_ADAPTERS_WARNING = "Already found a `peft_config` attribute in the model"


def lora_config(rank: int = LORA_RANK, alpha: int = LORA_ALPHA) -> Any:
    """The peft ``LoraConfig`` of character LoRAs (peft's default init: A random, B zero,
    so a fresh adapter changes nothing)."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(LORA_TARGETS),
                      init_lora_weights=True)


@dataclass(frozen=True)
class _Snapshot:
    adapters: tuple[str, ...]
    active: tuple[str, ...]
    enabled: bool
    requires_grad: dict[str, bool]
    training: bool
    checkpointing: bool


@contextmanager
def attached_adapter(
    transformer: Any,
    name: str,
    *,
    weights: dict[str, torch.Tensor] | None,
    init_seed: int,
    gradient_checkpointing: bool,
) -> Iterator[list[torch.nn.Parameter]]:
    """Attach LoRA adapter ``name`` (rank 16, alpha 16, on to_k/to_q/to_v/to_out.0) to
    ``transformer`` in train mode and yield its parameters (float32), sorted by name, as
    the only ones requiring grad. ``weights`` (a peft state dict without adapter names, from
    :func:`adapter_weights`) are loaded into it; None initialises it from ``init_seed``
    (the global RNG is left as it was). On exit the transformer is restored (see the
    module docstring). Raises ``ValueError`` when ``name`` is already attached."""
    from peft import set_peft_model_state_dict

    before = _snapshot(transformer)
    if name in before.adapters:
        raise ValueError(f"adapter {name!r} is already attached to the transformer")
    try:
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", _MULTIPLE_ADAPTERS_WARNING, UserWarning)
            torch.manual_seed(init_seed)
            transformer.add_adapter(lora_config(), adapter_name=name)
        params = _adapter_parameters(transformer, name)
        for param in params:  # before loading: a checkpoint's fp32 weights stay exact
            param.data = param.data.to(torch.float32)
        if weights is not None:
            result: Any = set_peft_model_state_dict(transformer, weights, adapter_name=name)
            if result.unexpected_keys:
                raise ValueError(f"checkpoint weights do not fit the adapter: "
                                 f"{sorted(result.unexpected_keys)[:3]}")
        if not before.enabled:
            transformer.enable_lora()
        transformer.set_adapter(name)
        for param in transformer.parameters():
            param.requires_grad_(False)
        for param in params:
            param.requires_grad_(True)
        transformer.train()
        if gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        yield params
    finally:
        _restore(transformer, name, before)


def adapter_weights(transformer: Any, name: str, dtype: torch.dtype | None = None
                    ) -> dict[str, torch.Tensor]:
    """CPU copies of adapter ``name``'s weights, keyed as peft saves them (no adapter name
    in the keys), in ``dtype`` when given."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(transformer, adapter_name=name)
    return {key: value.detach().to("cpu", dtype or value.dtype).clone()
            for key, value in state.items()}


def _adapter_parameters(transformer: Any, name: str) -> list[torch.nn.Parameter]:
    marker = f".{name}."
    params = sorted(((n, p) for n, p in transformer.named_parameters() if marker in n),
                    key=lambda item: item[0])
    if not params:
        raise RuntimeError(f"adapter {name!r} has no parameters after attaching it")
    return [p for _, p in params]


def _snapshot(transformer: Any) -> _Snapshot:
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapters = tuple(getattr(transformer, "peft_config", {}) or ())
    layers = [m for m in transformer.modules() if isinstance(m, BaseTunerLayer)]
    active = tuple(layers[0].active_adapters) if layers and adapters else ()
    enabled = not layers[0].disable_adapters if layers else True
    return _Snapshot(
        adapters=adapters, active=active, enabled=enabled,
        requires_grad={n: p.requires_grad for n, p in transformer.named_parameters()},
        training=transformer.training,
        checkpointing=bool(getattr(transformer, "gradient_checkpointing", False)),
    )


def _restore(transformer: Any, name: str, before: _Snapshot) -> None:
    if not before.adapters:
        transformer.unload_lora()  # back to the original modules
    else:
        active = [a for a in before.active if a in transformer.peft_config]
        if active:  # first, so that deleting ours never has to pick a new active one
            transformer.set_adapter(active)
        if name in (getattr(transformer, "peft_config", {}) or {}):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", f"Adapter {name} was active", UserWarning)
                transformer.delete_adapters(name)
        if not before.enabled:
            transformer.disable_lora()
    for param_name, param in transformer.named_parameters():
        wanted = before.requires_grad.get(param_name)
        if wanted is not None:
            param.requires_grad_(wanted)
        param.grad = None
    if not before.checkpointing and getattr(transformer, "gradient_checkpointing", False):
        transformer.disable_gradient_checkpointing()
    transformer.train(before.training)
