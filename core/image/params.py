"""An image request checked against FLUX facts before the GPU is touched.

Defaults come from settings; nothing is silently clamped or rounded: a width that is not
a multiple of 16 is an error naming ``width``, not an image of another size.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from schemas.errors import InvalidRequestError
from schemas.events import ImageRequested

__all__ = ["ImageLimits", "ImageParams", "derive_seed", "resolve_params"]

_MULTIPLE = 16  # VAE scale factor 8 × FLUX's 2×2 latent packing
_MIN_SIDE = 64
_MAX_GUIDANCE = 30.0
_SEED_MASK = 2**63 - 1


@dataclass(frozen=True)
class ImageLimits:
    max_image_size: int = 2048
    max_inference_steps: int = 100
    default_steps: int = 28
    default_guidance: float = 3.5
    default_negative_prompt: str = ""
    default_size: int = 1024  # FLUX.1-dev's size when a request gives none
    max_prompt_chars: int = 4000


@dataclass(frozen=True)
class ImageParams:
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    steps: int
    guidance: float
    seed: int
    lora_id: str | None
    optimize_prompt: bool


def derive_seed(request_id: str) -> int:
    """A seed fixed by ``request_id``, so a replay reproduces the same image."""
    digest = hashlib.sha256(request_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") & _SEED_MASK


def resolve_params(request: ImageRequested, limits: ImageLimits) -> ImageParams:
    """Applies defaults and checks every field; raises :class:`InvalidRequestError`
    naming the first bad field."""
    prompt = request.prompt.strip()
    if not prompt:
        raise InvalidRequestError("prompt: must not be empty", field="prompt")
    if len(prompt) > limits.max_prompt_chars:
        raise InvalidRequestError(
            f"prompt: at most {limits.max_prompt_chars} characters", field="prompt")
    sizes = {"width": request.width, "height": request.height}
    for field, value in sizes.items():
        value = limits.default_size if value is None else value
        if value % _MULTIPLE:
            raise InvalidRequestError(
                f"{field}: must be a multiple of {_MULTIPLE} (FLUX), got {value}", field=field)
        if not _MIN_SIDE <= value <= limits.max_image_size:
            raise InvalidRequestError(
                f"{field}: must be between {_MIN_SIDE} and MAX_IMAGE_SIZE="
                f"{limits.max_image_size}, got {value}", field=field)
        sizes[field] = value
    steps = limits.default_steps if request.num_inference_steps is None else \
        request.num_inference_steps
    if not 1 <= steps <= limits.max_inference_steps:
        raise InvalidRequestError(
            f"num_inference_steps: must be between 1 and {limits.max_inference_steps}, "
            f"got {steps}", field="num_inference_steps")
    guidance = limits.default_guidance if request.guidance_scale is None else \
        request.guidance_scale
    if not 0 <= guidance <= _MAX_GUIDANCE:
        raise InvalidRequestError(
            f"guidance_scale: must be between 0 and {_MAX_GUIDANCE}, got {guidance}",
            field="guidance_scale")
    given = request.negative_prompt if request.negative_prompt is not None else \
        limits.default_negative_prompt
    negative = given.strip() or None
    seed = derive_seed(request.request_id) if request.seed is None else request.seed
    lora_id = request.character_lora_id.strip() if request.character_lora_id else None
    return ImageParams(
        prompt=prompt, negative_prompt=negative, width=sizes["width"] or 0,
        height=sizes["height"] or 0, steps=steps, guidance=float(guidance), seed=seed,
        lora_id=lora_id or None, optimize_prompt=request.optimize_prompt,
    )
