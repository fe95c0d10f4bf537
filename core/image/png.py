"""Writing a generated image as a PNG that carries its generation parameters."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

__all__ = ["read_png_text", "write_png"]


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
