"""The adapter metadata saved with a LoRA file (diffusers' ``lora_adapter_metadata``).

diffusers rebuilds the adapter as ``LoraConfig(**metadata)`` when the file is loaded, so a
field that the loading peft does not know makes the file unloadable there. peft's
``LoraConfig.to_dict()`` holds every field of the peft that wrote it (peft 0.22 adds
``astra_config``, ``arrow_config``, ``use_bdlora``, …, which peft 0.18 refuses); the
metadata keeps only the fields that shape the weights, which every peft since 0.9 knows, so
a LoRA trained here loads in other tools and older installations."""

from __future__ import annotations

from typing import Any

__all__ = ["PORTABLE_FIELDS", "portable_metadata"]

PORTABLE_FIELDS = ("r", "lora_alpha", "target_modules", "lora_dropout", "bias", "use_rslora",
                   "use_dora")


def portable_metadata(config: Any) -> dict[str, Any]:
    """The :data:`PORTABLE_FIELDS` of peft ``LoraConfig`` ``config``, its target modules
    sorted (a set in peft: a fixed order keeps the file's bytes reproducible)."""
    full = config.to_dict()
    metadata = {name: full[name] for name in PORTABLE_FIELDS if name in full}
    metadata["target_modules"] = sorted(metadata["target_modules"])
    return metadata
