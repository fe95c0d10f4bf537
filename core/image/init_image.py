"""The starting image of an image-to-image request: fetched or inline, decoded safely.

Bytes come inline (``init_image``) or from ``init_image_url``, fetched by
:class:`~core.net.SafeFetcher` under the rules of LoRA training images: http/https only,
public addresses and LORA_FETCH_ALLOWED_HOSTS only, at most LORA_MAX_IMAGE_BYTES, within
LORA_FETCH_TIMEOUT. Decoding treats the bytes as hostile: PNG, JPEG or WebP by their magic
numbers only, the header's dimensions checked against LORA_MAX_IMAGE_PIXELS *before*
anything is decoded (Pillow's decompression-bomb guard raises the same refusal), truncated
or corrupt data refused, JPEGs decoded at a reduced scale when they are much larger than
the largest image the engine makes. Every refusal is an
:class:`~schemas.errors.InvalidRequestError` naming the field and a generic reason.
"""

from __future__ import annotations

import hashlib
import io
import struct
import warnings
from dataclasses import dataclass, field

import httpx
from PIL import Image, ImageOps, UnidentifiedImageError

from core.net import AllowedHosts, FetchLimits, SafeFetcher
from schemas.errors import InvalidRequestError

__all__ = ["InitImage", "InitImageLimits", "InitImageLoader", "decode_init_image"]

_FORMATS = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG"}
_BACKGROUND = (255, 255, 255)  # under transparent pixels


@dataclass(frozen=True)
class InitImageLimits:
    """LORA_MAX_IMAGE_BYTES, LORA_MAX_IMAGE_PIXELS, LORA_FETCH_TIMEOUT,
    LORA_FETCH_ALLOWED_HOSTS, and MAX_IMAGE_SIZE (JPEGs larger than it are decoded
    at a reduced scale)."""

    max_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000
    fetch_timeout: float = 30.0
    allowed_hosts: AllowedHosts = field(default_factory=AllowedHosts)
    max_side: int = 2048


@dataclass(frozen=True)
class InitImage:
    """A decoded starting image (RGB) and the sha256 of the bytes it came from."""

    image: Image.Image
    sha256: str


class InitImageLoader:
    """Loads starting images with ``http`` (the engine's shared client) within
    ``limits``."""

    def __init__(self, http: httpx.AsyncClient | None, limits: InitImageLimits) -> None:
        self._http = http
        self.limits = limits

    async def fetch(self, url: str) -> bytes:
        """The bytes at ``url`` (field ``init_image_url``); raises
        :class:`InvalidRequestError` (not allowed, 4xx, too large) or
        :class:`~schemas.errors.UpstreamUnavailableError` (retryable) as
        :class:`~core.net.SafeFetcher` does."""
        if self._http is None:
            raise InvalidRequestError("init_image_url: URLs are not fetched here",
                                      field="init_image_url")
        limits = FetchLimits(self.limits.max_bytes, self.limits.fetch_timeout,
                             max_bytes_setting="LORA_MAX_IMAGE_BYTES",
                             timeout_setting="LORA_FETCH_TIMEOUT")
        fetcher = SafeFetcher(self._http, limits, allowed_hosts=self.limits.allowed_hosts)
        return await fetcher.fetch(url, field="init_image_url")


def decode_init_image(data: bytes, field_name: str, limits: InitImageLimits) -> InitImage:
    """``data`` decoded to an RGB image (transparency over white, EXIF orientation
    applied); raises :class:`InvalidRequestError` naming ``field_name``. CPU-bound: call
    it off the event loop."""
    if not data:
        raise _refusal(field_name, "the image is empty")
    if len(data) > limits.max_bytes:
        raise _refusal(field_name, f"{len(data)} bytes is more than LORA_MAX_IMAGE_BYTES="
                       f"{limits.max_bytes}")
    kind = _sniff(data)
    if kind is None:
        raise _refusal(field_name, "the content is not a PNG, JPEG or WebP image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[kind]) as opened:
                width, height = opened.size  # from the header alone
                if width * height > limits.max_pixels:
                    raise _refusal(
                        field_name, f"{width}x{height} is more than LORA_MAX_IMAGE_PIXELS="
                        f"{limits.max_pixels} pixels (refused before decoding)")
                if kind == "JPEG" and max(width, height) > 2 * limits.max_side:
                    opened.draft("RGB", (limits.max_side, limits.max_side))
                opened.load()  # decodes all of it: truncated or corrupt data fails here
                image = _rgb(ImageOps.exif_transpose(opened))
    except InvalidRequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _refusal(field_name, "refused as a decompression bomb") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError,
            struct.error, IndexError) as exc:
        raise _refusal(field_name, f"not a valid {kind} image") from exc
    return InitImage(image, hashlib.sha256(data).hexdigest())


def _sniff(data: bytes) -> str | None:
    for magic, kind in _FORMATS.items():
        if data.startswith(magic):
            return kind
    if len(data) >= 12 and data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, _BACKGROUND)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image.convert("RGB")


def _refusal(field_name: str, reason: str) -> InvalidRequestError:
    return InvalidRequestError(f"{field_name}: {reason}", field=field_name)
