"""A LoRA trained here carries only the adapter metadata every peft knows: diffusers
rebuilds ``LoraConfig(**metadata)`` on load, and a field of a newer peft (0.22's
``astra_config``, …) made the file unloadable with an older one."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
from safetensors import safe_open

from core.lora.metadata import PORTABLE_FIELDS
from core.training.adapter import LORA_TARGETS
from core.training.checkpoint import TrainingFolder

# the LoraConfig fields of peft 0.9 (the oldest diffusers' LoRA metadata loads with)
PEFT_0_9_FIELDS = {
    "peft_type", "task_type", "inference_mode", "base_model_name_or_path", "revision",
    "auto_mapping", "r", "target_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out",
    "bias", "use_rslora", "modules_to_save", "init_lora_weights", "layers_to_transform",
    "layers_pattern", "rank_pattern", "alpha_pattern", "megatron_config",
    "megatron_core", "loftq_config", "use_dora",
}


def test_a_trained_lora_file_names_only_fields_an_older_peft_knows(tmp_path: Path) -> None:
    weights = {f"single_transformer_blocks.0.attn.{target}.lora_{part}.weight": torch.ones(2, 2)
               for target in LORA_TARGETS for part in "AB"}
    path = TrainingFolder(tmp_path).write_lora("mia_v1", weights, torch.float32)

    with safe_open(str(path), framework="pt") as handle:
        metadata = json.loads(handle.metadata()["lora_adapter_metadata"])
    fields = {name.removeprefix("transformer.") for name in metadata}
    assert fields <= set(PORTABLE_FIELDS) <= PEFT_0_9_FIELDS
    assert metadata["transformer.r"] == 16 and metadata["transformer.lora_alpha"] == 16
    assert metadata["transformer.target_modules"] == sorted(LORA_TARGETS)

    from peft import LoraConfig  # what diffusers does with it, on this peft

    config = LoraConfig(**{name.removeprefix("transformer."): value
                           for name, value in metadata.items()})
    assert config.r == 16 and set(config.target_modules) == set(LORA_TARGETS)
    assert set(PORTABLE_FIELDS) <= set(inspect.signature(LoraConfig).parameters)
