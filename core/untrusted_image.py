"""Images from outside (uploads, URLs, inline bytes) decoded as hostile input.

One set of rules for every image the engine takes in: LoRA training images
(:mod:`core.training.images`) and image-to-image starting images
(:mod:`core.image.init_image`).

- The format comes from the magic numbers only (PNG, JPEG or WebP), after the byte size
  was checked against LORA_MAX_IMAGE_BYTES (:func:`check_head`).
- The header's dimensions are checked against LORA_MAX_IMAGE_PIXELS *before* anything is
  decoded; Pillow's own guard (``Image.MAX_IMAGE_PIXELS``, refusing above twice its
  value) gives the same refusal.
- The file is verified and then decoded completely: truncated or corrupt data fails here.
- Decoded pixels become 8-bit RGB the same way for every use (:func:`to_rgb`):
  transparency over white, and 16-bit samples (a 16-bit grayscale PNG is Pillow's mode
  ``I;16``) scaled to 8 bits, not clipped (``convert("RGB")`` alone makes such an image
  almost entirely white).
- Whatever else Pillow raises on crafted data (malformed EXIF can raise ``TypeError``,
  ``KeyError`` or ``ZeroDivisionError`` as well as ``OSError``) becomes the same generic
  refusal: hostile input is never an ``INTERNAL`` error and never shows Pillow's text.

Every refusal is an :class:`~schemas.errors.InvalidRequestError` naming the field. No
warnings filter is touched: ``warnings.catch_warnings`` is process-wide state, not safe in
the threads these checks run in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import BinaryIO, TypeVar

import numpy as np
from PIL import Image

from schemas.errors import InvalidRequestError

__all__ = ["FORMATS", "check_head", "decode", "refusal", "sniff_format", "to_rgb"]

FORMATS = ("PNG", "JPEG", "WEBP")
"""The formats taken in (Pillow's names)."""

T = TypeVar("T")

_MAGIC = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG"}
_WHITE = (255, 255, 255)
_TRANSPARENT_MODES = frozenset({"RGBA", "LA", "PA"})
# One sample of more than 8 bits, on the 16-bit scale (0-65535): PNG's 16-bit grayscale
# opens as I;16; I and F hold the same values after Pillow converts them.
_HIGH_DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})


def sniff_format(head: bytes) -> str | None:
    """``PNG``, ``JPEG`` or ``WEBP`` by the magic numbers at the start of ``head`` (12
    bytes are enough), else ``None``."""
    for magic, kind in _MAGIC.items():
        if head.startswith(magic):
            return kind
    if len(head) >= 12 and head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def check_head(size: int, head: bytes, field: str, max_bytes: int) -> str:
    """The format of an image of ``size`` bytes starting with ``head``; raises
    :class:`InvalidRequestError` naming ``field`` when it is empty, larger than
    ``max_bytes`` (LORA_MAX_IMAGE_BYTES) or not PNG, JPEG or WebP."""
    if not size:
        raise refusal(field, "the image is empty")
    if size > max_bytes:
        raise refusal(field, f"{size} bytes is more than LORA_MAX_IMAGE_BYTES={max_bytes}")
    kind = sniff_format(head)
    if kind is None:
        raise refusal(field, "the content is not a PNG, JPEG or WebP image")
    return kind


def decode(open_data: Callable[[], BinaryIO], kind: str, field: str, *, max_pixels: int,
           finish: Callable[[Image.Image], T], min_side: int = 1,
           draft_side: int | None = None) -> T:
    """``finish(image)`` of the fully decoded image that ``open_data()`` streams (called
    twice: to verify, then to decode; each stream is closed here).

    Its header's dimensions must be within ``max_pixels`` (LORA_MAX_IMAGE_PIXELS) and each
    side at least ``min_side``, checked before decoding. A JPEG larger than twice
    ``draft_side`` is decoded at a reduced scale (the engine never uses more). ``finish``
    runs inside the same guard, so what it raises on crafted data (EXIF handling) is a
    refusal too. Raises :class:`InvalidRequestError` naming ``field``; CPU-bound: call it
    off the event loop."""
    try:
        with open_data() as stream, Image.open(stream, formats=[kind]) as header:
            _check_dimensions(*header.size, field, max_pixels, min_side)  # the header alone
            header.verify()
        with open_data() as stream, Image.open(stream, formats=[kind]) as image:
            if draft_side is not None and kind == "JPEG" \
                    and max(image.size) > 2 * draft_side:
                image.draft("RGB", (draft_side, draft_side))
            image.load()  # decodes all of it: truncated or corrupt data fails here
            return finish(image)
    except InvalidRequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # (the warning only when warnings are errors, as in the tests)
        raise refusal(field, "refused as a decompression bomb") from exc
    except Exception as exc:  # crafted data reaches odd corners of Pillow
        raise refusal(field, f"not a valid {kind} image") from exc


def to_rgb(image: Image.Image, background: tuple[int, int, int] = _WHITE) -> Image.Image:
    """``image`` as 8-bit RGB, for every image taken in (starting images, training photos).

    Transparency (an alpha channel, or a transparent colour or palette entry) is flattened
    over ``background``. Samples of more than 8 bits (modes ``I;16``, ``I;16B``, ``I``,
    ``F``) keep their high byte, as Pillow itself does for 16-bit RGB PNGs, so a 16-bit
    gradient stays a gradient; ``I`` and ``F`` are read on the same 0-65535 scale, and
    values outside it (which no PNG, JPEG or WebP holds) are clipped to it. Other modes
    (``1``, ``L``, ``P``, ``RGB``, ``CMYK``, ``YCbCr``…) are converted by Pillow."""
    if image.mode in _HIGH_DEPTH_MODES:
        image = _eight_bit(image)
    if image.mode in _TRANSPARENT_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, background)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image.convert("RGB")


def _eight_bit(image: Image.Image) -> Image.Image:
    """A one-sample image of more than 8 bits as ``L`` (``LA`` when a sample value is
    marked transparent, as a 16-bit grayscale PNG's ``tRNS`` can)."""
    samples = np.asarray(image)
    if samples.dtype.kind == "f" or samples.dtype.itemsize > 2:  # I and F
        samples = np.clip(samples, 0, 65535)
    gray = Image.fromarray((samples.astype(np.uint16) >> 8).astype(np.uint8), "L")
    transparent = image.info.get("transparency")
    if not isinstance(transparent, int | float):
        return gray
    opaque = np.where(samples == transparent, 0, 255).astype(np.uint8)
    return Image.merge("LA", (gray, Image.fromarray(opaque, "L")))


def refusal(field: str, reason: str) -> InvalidRequestError:
    """The refusal of the image in ``field``: ``"{field}: {reason}"``."""
    return InvalidRequestError(f"{field}: {reason}", field=field)


def _check_dimensions(width: int, height: int, field: str, max_pixels: int,
                      min_side: int) -> None:
    if width * height > max_pixels:
        raise refusal(field, f"{width}x{height} is {width * height} pixels, more than "
                      f"LORA_MAX_IMAGE_PIXELS={max_pixels} (refused before decoding: a "
                      "possible decompression bomb)")
    if min(width, height) < min_side:
        raise refusal(field, f"{width}x{height} is too small: each side must be at least "
                      f"{min_side} pixels")
