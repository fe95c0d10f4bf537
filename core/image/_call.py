"""One pipeline call for a batch of compatible jobs.

Each image keeps its own seeded ``torch.Generator`` (a list is passed), so an image depends
on its own seed only; batching changes pixels by at most about one level in 255
(float kernels differ with the batch size). Generators live on the CPU: the same seed
gives the same initial noise on any device. A job of ``count`` images adds ``count``
prompts and generators (seeds ``seed``, ``seed + 1``, …), so its images are one batch.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import torch
from PIL.Image import Image

from core.image.job import ImageJob

__all__ = ["Aborted", "AllCancelled", "call_pipeline"]

logger = logging.getLogger(__name__)


class Aborted(Exception):
    """The worker is stopping: the call was cut short between two steps."""


class AllCancelled(Exception):
    """Every job of the call was withdrawn: the call was cut short between two steps."""


def call_pipeline(
    pipeline: Any, jobs: list[ImageJob], *, max_sequence_length: int, abort: threading.Event,
    cancelled: Sequence[threading.Event],
) -> list[list[Image]]:
    """Generate each job's ``count`` images (all jobs sharing
    :func:`~core.image.job.batch_key`) in one call of ``pipeline`` (a ``FluxPipeline``, or
    a ``FluxImg2ImgPipeline`` for jobs with an ``init_image``); ``cancelled[i]`` is set when
    job ``i``'s caller withdraws it. Reports each step to every job still wanted's
    ``progress``; raises :class:`Aborted` when ``abort`` is set mid-call,
    :class:`AllCancelled` when every job is withdrawn (before the call or between two
    steps); lets torch's errors (out of memory) through."""
    if len(cancelled) != len(jobs):
        raise ValueError(f"{len(cancelled)} cancellation events for {len(jobs)} jobs")
    first = jobs[0]
    total = first.denoising_steps

    def check() -> None:
        if abort.is_set():
            raise Aborted("the GPU worker is stopping")
        if all(event.is_set() for event in cancelled):
            raise AllCancelled(f"all {len(jobs)} job(s) of the call were withdrawn")

    def on_step_end(_pipe: Any, index: int, _timestep: Any, _tensors: dict[str, Any]) -> dict[
        str, Any
    ]:
        check()
        for job, withdrawn in zip(jobs, cancelled):
            if job.progress is not None and not withdrawn.is_set():
                try:
                    job.progress(index + 1, total)
                except Exception:  # a reporting problem must not fail the image
                    logger.exception("progress callback failed at step %d", index + 1)
        return {}

    arguments: dict[str, Any] = {
        "prompt": _each_image(jobs, lambda job: job.prompt),
        "width": first.width,
        "height": first.height,
        "num_inference_steps": first.steps,
        "guidance_scale": first.guidance,
        "generator": [torch.Generator("cpu").manual_seed(seed)
                      for job in jobs for seed in job.seeds],
        "max_sequence_length": max_sequence_length,
        "output_type": "pil",
        "callback_on_step_end": on_step_end,
    }
    if first.negative_prompt is not None:
        arguments["negative_prompt"] = _each_image(jobs, lambda job: job.negative_prompt)
        arguments["true_cfg_scale"] = first.true_cfg_scale
    if first.init_image is not None:
        arguments["image"] = _each_image(jobs, lambda job: job.init_image)
        arguments["strength"] = first.strength
    check()  # the callers may have gone while the batch was gathered
    images = list(pipeline(**arguments).images)  # the pipelines' __call__ run under no_grad
    wanted = sum(job.count for job in jobs)
    if len(images) != wanted:  # pragma: no cover - diffusers' contract
        raise RuntimeError(f"pipeline returned {len(images)} images for {wanted} prompts")
    per_job: list[list[Image]] = []
    for job in jobs:
        per_job.append(images[:job.count])
        images = images[job.count:]
    return per_job


def _each_image(jobs: list[ImageJob], value: Any) -> list[Any]:
    """``value(job)`` once per image: ``count`` times for each job, in order."""
    return [value(job) for job in jobs for _ in range(job.count)]
