"""The POST /train-lora form as a client sends it."""

from __future__ import annotations

import aiohttp

__all__ = ["form"]


def form(images: list[bytes], **fields: str) -> aiohttp.FormData:
    """``images`` as PNG parts and the text fields (``character_id`` mia and
    ``trigger_word`` zqx unless ``fields`` say otherwise)."""
    data = aiohttp.FormData()
    for name, value in {"character_id": "mia", "trigger_word": "zqx", **fields}.items():
        data.add_field(name, value)
    for index, content in enumerate(images):
        data.add_field("images", content, filename=f"{index}.png", content_type="image/png")
    return data
