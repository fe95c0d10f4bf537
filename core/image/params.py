"""An image request checked against FLUX facts before the GPU is touched.

Defaults come from settings; nothing is silently clamped or rounded: a width that is not
a multiple of 16 is an error naming ``width``, not an image of another size. The one size
that is derived is image-to-image's default: the starting image's, scaled down to fit
MAX_IMAGE_SIZE and rounded to multiples of 16 (:func:`size_for_init`); a derived side the
aspect puts out of range is an error naming it, not a distorted image.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from urllib.parse import urlsplit

from core.image.job import denoising_steps
from core.seeds import derive_seed
from schemas.errors import InvalidRequestError
from schemas.events import ImageRequested

__all__ = ["ImageLimits", "ImageParams", "derive_seed", "resolve_params", "size_for_init"]

_MULTIPLE = 16  # VAE scale factor 8 × FLUX's 2×2 latent packing
_MIN_SIDE = 64
_MAX_GUIDANCE = 30.0


@dataclass(frozen=True)
class ImageLimits:
    max_image_size: int = 2048
    max_inference_steps: int = 100
    default_steps: int = 28
    default_guidance: float = 3.5
    default_negative_prompt: str = ""
    default_size: int = 1024  # FLUX.1-dev's size when a request gives none
    max_prompt_chars: int = 4000
    max_loras: int = 3  # MAX_LORAS_PER_REQUEST: the character's and the stacked ones
    default_quality: int = 90
    default_strength: float = 0.8
    max_batch_size: int = 4  # MAX_BATCH_SIZE: a request's images are one batch

    @property
    def default_side(self) -> int:
        """The side a request that gives none gets: ``default_size``, or the largest
        multiple of 16 within MAX_IMAGE_SIZE when that is smaller."""
        return min(self.default_size, self.max_image_size // _MULTIPLE * _MULTIPLE)


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
    lora_scale: float = 1.0
    loras: tuple[tuple[str, float], ...] = ()  # stacked: (lora_id, scale)
    num_images: int = 1
    output_format: str = "png"
    output_quality: int = 90
    init_image_url: str | None = None
    init_image: bytes | None = None
    strength: float = 0.8
    sized: tuple[bool, bool] = (True, True)  # whether width, height were given

    @property
    def image_to_image(self) -> bool:
        return self.init_image is not None or self.init_image_url is not None


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
        value = limits.default_side if value is None else value
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
    loras = _stacked_loras(request, lora_id or None, limits)
    num_images = request.num_images or 1
    if num_images > limits.max_batch_size:  # its images are one batch: never split
        raise InvalidRequestError(
            f"num_images: at most MAX_BATCH_SIZE={limits.max_batch_size} images per request "
            f"on this engine, got {num_images}", field="num_images")
    image_to_image = request.init_image is not None or request.init_image_url is not None
    strength = limits.default_strength if request.strength is None else request.strength
    if image_to_image:
        _check_init_source(request)
        if denoising_steps(steps, strength) < 1:
            raise InvalidRequestError(
                f"strength: {strength} leaves no denoising step of {steps} "
                f"(num_inference_steps); use at least {1 / steps:.4g}", field="strength")
    return ImageParams(
        prompt=prompt, negative_prompt=negative, width=sizes["width"] or 0,
        height=sizes["height"] or 0, steps=steps, guidance=float(guidance), seed=seed,
        lora_id=lora_id or None, optimize_prompt=request.optimize_prompt,
        lora_scale=1.0 if request.lora_scale is None else float(request.lora_scale),
        loras=loras, num_images=num_images,
        output_format=request.output_format or "png",
        output_quality=(limits.default_quality if request.output_quality is None
                        else request.output_quality),
        init_image_url=request.init_image_url, init_image=request.init_image,
        strength=float(strength),
        sized=(request.width is not None, request.height is not None),
    )


def size_for_init(params: ImageParams, init_size: tuple[int, int],
                  limits: ImageLimits) -> ImageParams:
    """``params`` with the sides the request did not give taken from the starting image
    (``init_size``): scaled, keeping its aspect, so that no side exceeds MAX_IMAGE_SIZE
    (and, where that allows, none is under 64), and rounded to the nearest multiple of 16.
    A side that was given stays; the other then keeps the starting image's aspect.

    Raises :class:`InvalidRequestError` naming a derived side that the aspect puts outside
    64 .. MAX_IMAGE_SIZE (it is never clamped: that would distort the image)."""
    if all(params.sized):
        return params
    init_width, init_height = init_size
    if params.sized[0]:
        factor = params.width / init_width
        because = f"width {params.width}"
    elif params.sized[1]:
        factor = params.height / init_height
        because = f"height {params.height}"
    else:  # the image's own size, brought within MIN_SIDE .. MAX_IMAGE_SIZE
        largest = limits.max_image_size / max(init_width, init_height)
        factor = min(1.0, largest)
        if min(init_width, init_height) * factor < _MIN_SIDE:
            factor = min(_MIN_SIDE / min(init_width, init_height), largest)
        because = "its size brought within MAX_IMAGE_SIZE"
    why = f"the starting image's aspect ({init_width}x{init_height}) at {because}"
    width = params.width if params.sized[0] else \
        _side("width", init_width * factor, limits, why)
    height = params.height if params.sized[1] else \
        _side("height", init_height * factor, limits, why)
    return replace(params, width=width, height=height, sized=(True, True))


def _side(name: str, value: float, limits: ImageLimits, why: str) -> int:
    """``value`` rounded to a multiple of 16; one that rounding alone takes past
    MAX_IMAGE_SIZE is the largest multiple within it."""
    top = limits.max_image_size // _MULTIPLE * _MULTIPLE
    rounded = round(value / _MULTIPLE) * _MULTIPLE
    if rounded > top and value <= limits.max_image_size:
        rounded = top
    if not _MIN_SIDE <= rounded <= top:
        raise InvalidRequestError(
            f"{name}: {why} makes it {value:.0f}, outside {_MIN_SIDE} .. MAX_IMAGE_SIZE="
            f"{limits.max_image_size}; give {name} explicitly", field=name)
    return rounded


def _stacked_loras(request: ImageRequested, lora_id: str | None,
                   limits: ImageLimits) -> tuple[tuple[str, float], ...]:
    total = len(request.loras) + (1 if lora_id else 0)
    if total > limits.max_loras:
        raise InvalidRequestError(
            f"loras: at most {limits.max_loras} LoRAs per request in all, character_lora_id "
            f"included (MAX_LORAS_PER_REQUEST), got {total}", field="loras")
    seen = {lora_id} if lora_id else set()
    stacked = []
    for index, entry in enumerate(request.loras):
        name = entry.lora_id.strip()
        if name in seen:
            raise InvalidRequestError(
                f"loras.{index}.lora_id: {name!r} is already in the request",
                field=f"loras.{index}.lora_id")
        seen.add(name)
        stacked.append((name, float(entry.scale)))
    return tuple(stacked)


def _check_init_source(request: ImageRequested) -> None:
    if request.init_image is not None and request.init_image_url is not None:
        raise InvalidRequestError(
            "init_image: give init_image or init_image_url, not both", field="init_image")
    url = request.init_image_url
    if url is not None:
        try:
            parts = urlsplit(url.strip())
            host = parts.hostname
        except ValueError:
            host = None
            parts = None
        if parts is None or parts.scheme not in ("http", "https") or not host:
            raise InvalidRequestError(
                "init_image_url: must be an http or https URL", field="init_image_url")
