"""One image to generate, as the GPU worker takes it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from core.lora.registry import LoraInfo

__all__ = ["BatchKey", "ImageJob", "batch_key"]


@dataclass(frozen=True)
class ImageJob:
    """A validated image request. ``negative_prompt`` acts only with ``true_cfg_scale`` > 1
    (FLUX's true CFG, two transformer passes per step). ``progress(step, total)`` is
    called from the worker thread after each denoising step; it must be quick and
    thread-safe (bridge it to the event loop with ``call_soon_threadsafe``)."""

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


BatchKey = tuple[int, int, int, float, float | None, tuple[str, str] | None]


def batch_key(job: ImageJob) -> BatchKey:
    """Jobs with equal keys can share one pipeline call: same size, steps, guidance, LoRA,
    and negative prompt presence (with its true CFG scale, which only then matters)."""
    cfg = job.true_cfg_scale if job.negative_prompt is not None else None
    lora = (job.lora.lora_id, job.lora.fingerprint) if job.lora is not None else None
    return (job.width, job.height, job.steps, job.guidance, cfg, lora)
