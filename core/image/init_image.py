"""The starting image of an image-to-image request: fetched or inline, decoded safely.

Bytes come inline (``init_image``) or from ``init_image_url``, fetched by
:class:`~core.net.SafeFetcher` under the rules of LoRA training images: http/https only,
public addresses and LORA_FETCH_ALLOWED_HOSTS only, at most LORA_MAX_IMAGE_BYTES, within
LORA_FETCH_TIMEOUT. Decoding treats the bytes as hostile, by the rules training images
follow too (:mod:`core.untrusted_image`): PNG, JPEG or WebP by their magic numbers only,
the header's dimensions checked against LORA_MAX_IMAGE_PIXELS *before* anything is
decoded, truncated, corrupt or crafted data refused, JPEGs decoded at a reduced scale when
they are much larger than the largest image the engine makes. Every refusal is an
:class:`~schemas.errors.InvalidRequestError` naming the field and a generic reason.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field

import httpx
from PIL import Image, ImageOps

from core.net import AllowedHosts, FetchLimits, SafeFetcher
from core.untrusted_image import check_head, decode, to_rgb
from schemas.errors import InvalidRequestError

__all__ = ["InitImage", "InitImageLimits", "InitImageLoader", "decode_init_image"]


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
    """``data`` decoded to an 8-bit RGB image (transparency over white, 16-bit samples
    scaled, EXIF orientation applied) by the rules of :mod:`core.untrusted_image`; raises
    :class:`InvalidRequestError` naming ``field_name``. CPU-bound: call it off the event
    loop."""
    kind = check_head(len(data), data[:12], field_name, limits.max_bytes)
    image = decode(lambda: io.BytesIO(data), kind, field_name, max_pixels=limits.max_pixels,
                   draft_side=limits.max_side,
                   finish=lambda opened: to_rgb(ImageOps.exif_transpose(opened)))
    return InitImage(image, hashlib.sha256(data).hexdigest())

