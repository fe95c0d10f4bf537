"""A training request → a :class:`TrainingSpec` and its checked images, in memory.

Everything is checked before anything is written: the character id, trigger word and
hyperparameters, the image count (URLs and inline images together, before any download),
then each image (fetched when it is a URL). The first problem raises
:class:`~schemas.errors.InvalidRequestError` naming its field (``images.3``,
``image_urls.0``, ``trigger_word``…); a fetch that may succeed later raises
:class:`~schemas.errors.UpstreamUnavailableError`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import httpx

from core.training.fetch import fetch_image
from core.training.images import CheckedImage, check_count, check_image
from core.training.spec import (
    Origin,
    TrainingLimits,
    TrainingSpec,
    caption_for,
    check_character_id,
    check_hyperparameters,
    check_trigger_word,
    training_id_for,
)
from schemas.events import LoraTrainingRequested

__all__ = ["Intake", "spec_identity"]


def spec_identity(request: LoraTrainingRequested) -> str:
    """The training id of ``request`` after checking its character id and trigger word
    (cheap: no image is looked at). Raises :class:`InvalidRequestError`."""
    check_character_id(request.character_id)
    check_trigger_word(request.trigger_word)
    return training_id_for(request.character_id, request.request_id)


@dataclass(frozen=True)
class Intake:
    """Checks requests against ``limits``, fetching URLs with ``http`` (the engine's shared
    client) at most ``fetch_concurrency`` at a time within ``fetch_timeout`` seconds each."""

    limits: TrainingLimits
    http: httpx.AsyncClient
    fetch_timeout: float
    fetch_concurrency: int = 4

    async def take(self, request: LoraTrainingRequested, origin: Origin
                   ) -> tuple[TrainingSpec, list[CheckedImage]]:
        """The spec and the images of ``request``; raises as the module docstring says."""
        training_id = spec_identity(request)
        steps, rate, resolution = check_hyperparameters(
            request.steps, request.learning_rate, request.resolution, self.limits)
        check_count(len(request.image_urls) + len(request.images), self.limits)
        inline = [asyncio.to_thread(check_image, image.data, f"images.{i}", self.limits)
                  for i, image in enumerate(request.images)]
        gate = asyncio.Semaphore(self.fetch_concurrency)
        fetched = [self._fetch(url, f"image_urls.{i}", gate)
                   for i, url in enumerate(request.image_urls)]
        images = list(await _all_or_first_error([*fetched, *inline]))
        spec = TrainingSpec(
            training_id=training_id, request_id=request.request_id,
            conversation_id=request.conversation_id, character_id=request.character_id,
            trigger_word=request.trigger_word, caption=caption_for(request.trigger_word),
            steps=steps, learning_rate=rate, resolution=resolution,
            batch_size=self.limits.batch_size, origin=origin,
            image_sha256=tuple(image.sha256 for image in images),
        )
        return spec, images

    async def _fetch(self, url: str, field: str, gate: asyncio.Semaphore) -> CheckedImage:
        async with gate:
            data = await fetch_image(self.http, url, field=field,
                                     max_bytes=self.limits.max_image_bytes,
                                     timeout=self.fetch_timeout)
        return await asyncio.to_thread(check_image, data, field, self.limits)


async def _all_or_first_error(
    coroutines: list[Coroutine[Any, Any, CheckedImage]],
) -> list[CheckedImage]:
    """Runs all; returns the results in order, or raises the error of the first one (by
    position) that failed, so the same request always names the same image."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        await asyncio.wait(tasks)
    finally:
        for task in tasks:
            task.cancel()
    errors = [task.exception() for task in tasks]
    for error in errors:
        if error is not None:
            raise error
    return [task.result() for task in tasks]
