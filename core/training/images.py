"""Training images checked before anything is written into a training's folder.

An image is accepted when it passes the engine's rules for images from outside
(:mod:`core.untrusted_image`): its bytes (not its name) are PNG, JPEG or WebP by their
magic numbers and Pillow agrees, it is at most LORA_MAX_IMAGE_BYTES, its header's
dimensions are within LORA_MAX_IMAGE_PIXELS (checked *before* decoding: a decompression
bomb is refused by its header) and each side at least 64 pixels, and it decodes completely
(truncated, corrupt or crafted data is refused). Each refusal is an
:class:`~schemas.errors.InvalidRequestError` whose ``field`` names the image
(``images.3``, ``image_urls.0``) and whose message says why.

Images in memory (inline, fetched) are checked from their bytes (:func:`check_image`);
uploaded ones from their file (:func:`check_image_file`), so that a checked upload keeps
only its path, not its bytes.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from PIL import Image

from core.training.spec import TrainingLimits
from core.untrusted_image import check_head, decode, sniff_format
from schemas.errors import InvalidRequestError

__all__ = ["CheckedImage", "check_count", "check_image", "check_image_file", "sniff_format"]

_HASH_CHUNK = 2**20


@dataclass(frozen=True)
class CheckedImage:
    """A valid image: ``format`` is ``PNG``, ``JPEG`` or ``WEBP``. Its content is ``data``,
    or, when ``path`` is set (an uploaded file), that file's (``data`` then empty)."""

    data: bytes
    format: str
    width: int
    height: int
    sha256: str
    path: Path | None = None

    @property
    def suffix(self) -> str:
        return {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}[self.format]


def check_count(count: int, limits: TrainingLimits, field: str = "images") -> None:
    """Raises :class:`InvalidRequestError` (``field``) unless MIN_LORA_IMAGES <= count <=
    MAX_LORA_IMAGES."""
    if count < limits.min_images:
        raise InvalidRequestError(
            f"at least {limits.min_images} training images are needed (MIN_LORA_IMAGES), "
            f"got {count}", field=field)
    if count > limits.max_images:
        raise InvalidRequestError(
            f"at most {limits.max_images} training images are allowed (MAX_LORA_IMAGES), "
            f"got {count}", field=field)


def check_image(data: bytes, field: str, limits: TrainingLimits) -> CheckedImage:
    """``data`` as a :class:`CheckedImage`; raises :class:`InvalidRequestError` naming
    ``field`` and the reason. CPU-bound (it decodes): call it off the event loop."""
    kind = check_head(len(data), data[:12], field, limits.max_image_bytes)
    width, height = _decode(lambda: io.BytesIO(data), kind, field, limits)
    return CheckedImage(data, kind, width, height, hashlib.sha256(data).hexdigest())


def check_image_file(path: Path, field: str, limits: TrainingLimits) -> CheckedImage:
    """The image in file ``path`` as a :class:`CheckedImage` that refers to the file
    (its bytes are not kept); raises like :func:`check_image`, and ``OSError`` when the
    file cannot be read. Blocking and CPU-bound: call it off the event loop."""
    with path.open("rb") as handle:
        size = path.stat().st_size
        kind = check_head(size, handle.read(12), field, limits.max_image_bytes)
    width, height = _decode(lambda: path.open("rb"), kind, field, limits)
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return CheckedImage(b"", kind, width, height, digest.hexdigest(), path=path)


def _decode(open_data: Callable[[], BinaryIO], kind: str, field: str,
            limits: TrainingLimits) -> tuple[int, int]:
    """Width and height, after checking them from the header and decoding it all."""
    return decode(open_data, kind, field, max_pixels=limits.max_image_pixels,
                  min_side=limits.min_image_side, finish=_size)


def _size(image: Image.Image) -> tuple[int, int]:
    return image.size
