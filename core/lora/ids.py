"""LoRA ids: safe names (``^[A-Za-z0-9_.-]{1,64}$``, not starting with a dot), so that an
id can never name a path outside the registry's folder or the store's prefix."""

from __future__ import annotations

import re

__all__ = ["SAFE_LORA_ID", "is_safe_lora_id"]

SAFE_LORA_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
"""The characters and length of an id (:func:`is_safe_lora_id` also refuses a leading dot)."""


def is_safe_lora_id(lora_id: str) -> bool:
    """Whether ``lora_id`` is a name the registry accepts (no separators, no leading dot)."""
    return bool(SAFE_LORA_ID.match(lora_id)) and not lora_id.startswith(".")
