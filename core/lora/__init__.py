"""Character LoRAs: the registry of trained files and the adapters loaded in the pipeline."""

from core.lora.adapters import AdapterSet, LoraLoadError
from core.lora.registry import LoraInfo, LoraRegistry, is_safe_lora_id

__all__ = ["AdapterSet", "LoraInfo", "LoraLoadError", "LoraRegistry", "is_safe_lora_id"]
