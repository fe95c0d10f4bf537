"""Checked images → the training tensor: upright, RGB, square at the training resolution.

Each image is turned upright by its EXIF orientation, made 8-bit RGB as every image taken
in is (:func:`core.untrusted_image.to_rgb`: transparency over white, 16-bit samples
scaled, not clipped), scaled so its shorter side is the resolution (Lanczos) and
centre-cropped.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from core.untrusted_image import to_rgb

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
        image = to_rgb(ImageOps.exif_transpose(opened))
        fitted = ImageOps.fit(image, (resolution, resolution), Image.Resampling.LANCZOS)
        return np.asarray(fitted, dtype=np.uint8)
