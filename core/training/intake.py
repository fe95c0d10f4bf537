"""A training request → a :class:`TrainingSpec` and its checked images (in memory, or
uploaded files referred to by path).

Everything is checked before anything is written: the character id, trigger word and
hyperparameters, the image count (URLs, inline images and uploads together, before any
download),
then each image (fetched when it is a URL, read from its file when it was uploaded),
decoding at most two at a time (a decode may take 100+ MB). The first problem raises
:class:`~schemas.errors.InvalidRequestError` naming its field (``images.3``,
``image_urls.0``, ``trigger_word``…); a fetch that may succeed later raises
:class:`~schemas.errors.UpstreamUnavailableError`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

from core.net import AllowedHosts
from core.training.fetch import fetch_image
from core.training.images import CheckedImage, check_count, check_image, check_image_file
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

T = TypeVar("T")

_DECODE_CONCURRENCY = 2


def spec_identity(request: LoraTrainingRequested) -> str:
    """The training id of ``request`` after checking its character id and trigger word
    (cheap: no image is looked at). Raises :class:`InvalidRequestError`."""
    check_character_id(request.character_id)
    check_trigger_word(request.trigger_word)
    return training_id_for(request.character_id, request.request_id)


@dataclass(frozen=True)
class Intake:
    """Checks requests against ``limits``, fetching URLs with ``http`` (the engine's shared
    client) at most ``fetch_concurrency`` at a time within ``fetch_timeout`` seconds each,
    from public addresses and ``fetch_allowed_hosts`` only."""

    limits: TrainingLimits
    http: httpx.AsyncClient
    fetch_timeout: float
    fetch_concurrency: int = 4
    fetch_allowed_hosts: AllowedHosts = field(default_factory=AllowedHosts)
    _decoding: asyncio.Semaphore = field(
        default_factory=lambda: asyncio.Semaphore(_DECODE_CONCURRENCY), init=False,
        repr=False, compare=False)

    async def take(self, request: LoraTrainingRequested, origin: Origin,
                   files: Sequence[Path] = ()) -> tuple[TrainingSpec, list[CheckedImage]]:
        """The spec and the images of ``request``, ``files`` (uploaded images, named
        ``images.{n}`` after the inline ones) included; raises as the module docstring
        says."""
        training_id = spec_identity(request)
        steps, rate, resolution = check_hyperparameters(
            request.steps, request.learning_rate, request.resolution, self.limits)
        check_count(len(request.image_urls) + len(request.images) + len(files), self.limits)
        inline = [self._check(check_image, image.data, f"images.{i}")
                  for i, image in enumerate(request.images)]
        uploaded = [self._check(check_image_file, path, f"images.{len(request.images) + i}")
                    for i, path in enumerate(files)]
        gate = asyncio.Semaphore(self.fetch_concurrency)
        fetched = [self._fetch(url, f"image_urls.{i}", gate)
                   for i, url in enumerate(request.image_urls)]
        images = list(await _all_or_first_error([*fetched, *inline, *uploaded]))
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
                                     timeout=self.fetch_timeout,
                                     allowed_hosts=self.fetch_allowed_hosts)
        return await self._check(check_image, data, field)

    async def _check(self, check: Callable[[T, str, TrainingLimits], CheckedImage], source: T,
                     field: str) -> CheckedImage:
        """``check(source, field, limits)`` in a thread, at most _DECODE_CONCURRENCY at once
        (across requests)."""
        async with self._decoding:
            return await asyncio.to_thread(check, source, field, self.limits)


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
