"""One image request as the GPU worker takes it: its images, LoRAs and starting image."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from PIL.Image import Image

from core.lora.registry import LoraInfo

__all__ = ["SEED_LIMIT", "ActiveLora", "BatchKey", "ImageJob", "batch_key", "decoded_in_tiles",
           "denoising_steps"]

SEED_LIMIT = 2**63  # seeds are Avro longs: seed + k wraps around below this

ActiveLora = tuple[LoraInfo, float]
"""A LoRA and the scale it runs at."""


@dataclass(frozen=True)
class ImageJob:
    """A validated image request. ``negative_prompt`` acts only with ``true_cfg_scale`` > 1
    (FLUX's true CFG, two transformer passes per step). ``progress(step, total)`` is
    called from the worker thread after each denoising step; it must be quick and
    thread-safe (bridge it to the event loop with ``call_soon_threadsafe``).

    ``lora`` runs at ``lora_scale`` with ``extra_loras`` stacked on it (a scale of 0 leaves
    a LoRA out). ``count`` images are made in the same call, with seeds ``seed``,
    ``seed + 1``, … (:attr:`seeds`). With ``init_image`` (already at ``width`` ×
    ``height``) the job is image-to-image at ``strength``."""

    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    steps: int
    guidance: float
    true_cfg_scale: float
    seed: int
    lora: LoraInfo | None
    progress: Callable[[int, int], None] | None = None
    lora_scale: float = 1.0
    extra_loras: tuple[ActiveLora, ...] = ()
    count: int = 1
    init_image: Image | None = field(default=None, compare=False)
    strength: float = 1.0

    @property
    def seeds(self) -> tuple[int, ...]:
        """One seed per image: ``seed``, ``seed + 1``, … (modulo 2**63)."""
        return tuple((self.seed + index) % SEED_LIMIT for index in range(self.count))

    @property
    def adapters(self) -> tuple[ActiveLora, ...]:
        """The LoRAs that act, with their scales: the character's first."""
        stacked = ((self.lora, self.lora_scale),) if self.lora is not None else ()
        return tuple((info, scale) for info, scale in stacked + self.extra_loras if scale > 0)

    @property
    def denoising_steps(self) -> int:
        """The steps the pipeline runs: ``steps``, or fewer image-to-image."""
        if self.init_image is None:
            return self.steps
        return denoising_steps(self.steps, self.strength)


def denoising_steps(steps: int, strength: float) -> int:
    """The steps FluxImg2ImgPipeline runs for ``steps`` at ``strength`` (its
    ``get_timesteps``): the last ``strength`` share of the schedule; 0 means none."""
    start = int(max(steps - min(steps * strength, steps), 0))
    return steps - start


BatchKey = tuple[
    int, int, int, float, float | None, tuple[tuple[str, str, float], ...], float | None]


def batch_key(job: ImageJob) -> BatchKey:
    """Jobs with equal keys can share one pipeline call: same size, steps, guidance, LoRAs
    and scales, negative prompt presence (with its true CFG scale, which only then
    matters), and mode (text-to-image, or image-to-image at one strength)."""
    cfg = job.true_cfg_scale if job.negative_prompt is not None else None
    adapters = tuple((info.lora_id, info.fingerprint, scale) for info, scale in job.adapters)
    strength = job.strength if job.init_image is not None else None
    return (job.width, job.height, job.steps, job.guidance, cfg, adapters, strength)


def decoded_in_tiles(width: int, height: int, threshold: int) -> bool:
    """Whether an image of ``width`` × ``height`` is decoded by the VAE in tiles under
    VAE_TILING_THRESHOLD ``threshold``: when its longer side is over it. (Tiles change the
    pixels, so the result key says so too.)"""
    return max(width, height) > threshold
