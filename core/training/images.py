"""Training images checked before anything is written into a training's folder.

An image is accepted when its bytes (not its name) are PNG, JPEG or WebP by their magic
numbers and Pillow agrees, it is at most LORA_MAX_IMAGE_BYTES, its header's dimensions are
within LORA_MAX_IMAGE_PIXELS (checked *before* decoding: a decompression bomb is refused by
its header, and Pillow's own bomb guard is turned into the same refusal), and it decodes
completely (truncated or corrupt data is refused). Each refusal is an
:class:`~schemas.errors.InvalidRequestError` whose ``field`` names the image
(``images.3``, ``image_urls.0``) and whose message says why.

Images in memory (inline, fetched) are checked from their bytes (:func:`check_image`);
uploaded ones from their file (:func:`check_image_file`), so that a checked upload keeps
only its path, not its bytes.
"""

from __future__ import annotations

import hashlib
import io
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from PIL import Image, UnidentifiedImageError

from core.training.spec import TrainingLimits
from schemas.errors import InvalidRequestError

__all__ = ["CheckedImage", "check_count", "check_image", "check_image_file", "sniff_format"]

_WEBP_TAG = b"WEBP"
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


def sniff_format(data: bytes) -> str | None:
    """``PNG``, ``JPEG`` or ``WEBP`` by the magic numbers at the start of ``data``."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if len(data) >= 12 and data.startswith(b"RIFF") and data[8:12] == _WEBP_TAG:
        return "WEBP"
    return None


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
    kind = _check_head(len(data), data[:12], field, limits)
    width, height = _decode(lambda: io.BytesIO(data), kind, field, limits)
    return CheckedImage(data, kind, width, height, hashlib.sha256(data).hexdigest())


def check_image_file(path: Path, field: str, limits: TrainingLimits) -> CheckedImage:
    """The image in file ``path`` as a :class:`CheckedImage` that refers to the file
    (its bytes are not kept); raises like :func:`check_image`, and ``OSError`` when the
    file cannot be read. Blocking and CPU-bound: call it off the event loop."""
    with path.open("rb") as handle:
        size = path.stat().st_size
        kind = _check_head(size, handle.read(12), field, limits)
    width, height = _decode(lambda: path.open("rb"), kind, field, limits)
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return CheckedImage(b"", kind, width, height, digest.hexdigest(), path=path)


def _check_head(size: int, head: bytes, field: str, limits: TrainingLimits) -> str:
    """The format by the magic numbers, after the size check."""
    if not size:
        raise _refusal(field, "the file is empty")
    if size > limits.max_image_bytes:
        raise _refusal(field, f"{size} bytes is more than LORA_MAX_IMAGE_BYTES="
                     f"{limits.max_image_bytes}")
    kind = sniff_format(head)
    if kind is None:
        raise _refusal(field, "the content is not a PNG, JPEG or WebP image")
    return kind


def _decode(open_data: Callable[[], BinaryIO], kind: str, field: str,
            limits: TrainingLimits) -> tuple[int, int]:
    """Width and height, after checking them from the header and decoding it all."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with open_data() as data, Image.open(data, formats=[kind]) as header:
                width, height = header.size  # from the header alone
                _check_dimensions(width, height, field, limits)
                header.verify()
            with open_data() as data, Image.open(data, formats=[kind]) as image:
                image.load()  # decodes all of it: truncated or corrupt data fails here
    except InvalidRequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _refusal(field, f"refused as a decompression bomb: {exc}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError,
            struct.error, IndexError) as exc:
        raise _refusal(field, f"not a valid {kind} image: {exc}") from exc
    return width, height


def _refusal(field: str, reason: str) -> InvalidRequestError:
    return InvalidRequestError(f"{field}: {reason}", field=field)


def _check_dimensions(width: int, height: int, field: str, limits: TrainingLimits) -> None:
    if width * height > limits.max_image_pixels:
        raise _refusal(field, f"{width}x{height} is {width * height} pixels, more than "
                       f"LORA_MAX_IMAGE_PIXELS={limits.max_image_pixels} (refused before "
                       "decoding: a possible decompression bomb)")
    if min(width, height) < limits.min_image_side:
        raise _refusal(field, f"{width}x{height} is too small: each side must be at least "
                       f"{limits.min_image_side} pixels")
