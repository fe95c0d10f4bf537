"""Checked images → the training tensor: upright, RGB, square at the training resolution.

Each image is turned upright by its EXIF orientation, flattened onto white when it has
transparency, scaled so its shorter side is the resolution (Lanczos) and centre-cropped.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

__all__ = ["to_pixels"]


def to_pixels(images: Sequence[bytes], resolution: int) -> torch.Tensor:
    """(N, 3, resolution, resolution) float32 in [-1, 1], in the order given. The bytes must
    have passed :func:`~core.training.images.check_image`. CPU-bound: call it off the
    event loop."""
    arrays = [_square(data, resolution) for data in images]
    stacked = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return stacked / 127.5 - 1.0


def _square(data: bytes, resolution: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as opened:
        image = ImageOps.exif_transpose(opened)
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            image = Image.new("RGB", rgba.size, (255, 255, 255))
            image.paste(rgba, mask=rgba.getchannel("A"))
        fitted = ImageOps.fit(image.convert("RGB"), (resolution, resolution),
                              Image.Resampling.LANCZOS)
        return np.asarray(fitted, dtype=np.uint8)
