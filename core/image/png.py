"""Writing a generated image as a PNG that carries its generation parameters."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from PIL import Image
from PIL.PngImagePlugin import PngInfo

__all__ = ["write_png", "read_png_text"]


def write_png(path: Path, image: Image.Image, parameters: Mapping[str, object]) -> None:
    """Saves ``image`` to ``path`` with one ``tEXt``/``iTXt`` chunk per parameter."""
    info = PngInfo()
    for key, value in parameters.items():
        if value is not None:
            info.add_itxt(key, str(value))
    image.save(path, format="PNG", pnginfo=info)


def read_png_text(path: Path) -> dict[str, str]:
    with Image.open(path) as image:
        image.load()
        return dict(getattr(image, "text", {}))
