"""What a LoRA safetensors file says about itself: rank, alpha and target modules.

Read from the header only (diffusers' ``lora_adapter_metadata`` and the shapes of the
``lora_A`` tensors), without loading the weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LoraShape", "read_lora_shape"]

_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY


@dataclass(frozen=True)
class LoraShape:
    rank: int
    alpha: float
    targets: tuple[str, ...]


def read_lora_shape(path: Path) -> LoraShape:
    """Rank, alpha and targets of the LoRA in ``path``.

    Raises ``ValueError`` when the file is no safetensors file or holds no LoRA tensors,
    ``OSError`` when it cannot be read.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            ranks: dict[str, int] = {}
            for key in handle.keys():  # noqa: SIM118 - a safe_open handle, no dict
                if ".lora_A." in key or ".lora_down." in key:
                    module = key.split(".lora_")[0]
                    ranks[module] = int(handle.get_slice(key).get_shape()[0])
    except SafetensorError as exc:
        raise ValueError(f"{path} is not a safetensors file: {exc}") from exc
    if not ranks:
        raise ValueError(f"{path} holds no LoRA tensors (no lora_A weights)")
    meta = _adapter_metadata(header)
    rank = int(str(meta.get("r", max(ranks.values()))))
    alpha = float(str(meta.get("lora_alpha", rank)))
    declared = meta.get("target_modules")
    if isinstance(declared, list) and declared:
        targets = tuple(sorted(str(target) for target in declared))
    else:
        targets = tuple(sorted({_target_name(module) for module in ranks}))
    return LoraShape(rank=rank, alpha=alpha, targets=targets)


def _adapter_metadata(header: dict[str, str]) -> dict[str, object]:
    """The transformer's peft config saved by ``save_lora_weights`` (keys un-prefixed)."""
    try:
        raw = json.loads(header.get(_METADATA_KEY, "{}"))
    except ValueError:
        return {}
    if not isinstance(raw, dict):
        return {}
    prefix = "transformer."
    return {key.removeprefix(prefix): value for key, value in raw.items()
            if key.startswith(prefix)}


def _target_name(module: str) -> str:
    parts = module.split(".")
    if len(parts) >= 2 and parts[-1].isdigit():  # to_out.0
        return ".".join(parts[-2:])
    return parts[-1]
