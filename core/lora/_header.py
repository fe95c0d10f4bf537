"""What a LoRA safetensors file says about itself: rank, alpha and target modules.

Read from the header only (diffusers' ``lora_adapter_metadata`` and the shapes of the
``lora_A`` tensors), without loading the weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LoraShape", "read_header", "read_lora_shape"]

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
    header, shapes = read_header(path)
    ranks = {key.split(".lora_")[0]: int(shape[0]) for key, shape in shapes.items()
             if ".lora_A." in key or ".lora_down." in key}
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


def read_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """The metadata of the safetensors file at ``path`` and each tensor's shape, from its
    header alone. Raises ``ValueError`` when it is no safetensors file, ``OSError`` when it
    cannot be read."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}, {
                key: tuple(handle.get_slice(key).get_shape())
                for key in handle.keys()}  # noqa: SIM118 - a safe_open handle, no dict
    except SafetensorError as exc:
        raise ValueError(f"{path} is not a safetensors file: {exc}") from exc


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
