"""A finished run → its LoRA registered as ``{character_id}_v{n}`` (with the training's
metadata: hyperparameters, probe losses, the step it resumed from), then a validation
image rendered with it through the image service and its URL recorded beside it.

A store that fails at the registration is a retryable ``UPSTREAM_UNAVAILABLE`` (the last
checkpoint stays for the retry, which finds or completes the registration); a validation
image that fails, or whose URL cannot be recorded, is logged: the LoRA is registered and
usable.
"""

from __future__ import annotations

import asyncio
import logging

import torch

from core.image.service import ImageService
from core.lora.registry import LoraInfo, LoraRegistry
from core.storage import StorageError, unavailable
from core.training.checkpoint import TrainingFolder
from core.training.register import register_lora
from core.training.runner import RunResult
from core.training.spec import TrainingSpec
from schemas.errors import EngineError
from schemas.events import ImageRequested, utc_now_iso

__all__ = ["Registration"]

logger = logging.getLogger(__name__)


class Registration:
    """Registers finished trainings in ``registry`` for ``base_model`` (LoRA weights saved
    in ``lora_dtype``), their validation images made by ``images``."""

    def __init__(self, registry: LoraRegistry, images: ImageService, *, base_model: str,
                 lora_dtype: torch.dtype) -> None:
        self._registry = registry
        self._images = images
        self._base_model = base_model
        self._lora_dtype = lora_dtype

    async def register(self, spec: TrainingSpec, folder: TrainingFolder,
                       result: RunResult) -> LoraInfo:
        """The LoRA ``result`` of ``spec`` registered (with its validation image's URL
        when one was made). Raises :class:`~schemas.errors.UpstreamUnavailableError`
        when the store fails, ``OSError`` when the local disk does."""
        training = {
            "training_id": spec.training_id, "request_id": spec.request_id,
            "character_id": spec.character_id, "caption": spec.caption, "steps": spec.steps,
            "learning_rate": spec.learning_rate, "resolution": spec.resolution,
            "batch_size": spec.batch_size, "images": spec.image_count,
            "image_sha256": list(spec.image_sha256), "final_loss": result.state.loss,
            "probe_loss_start": result.probe_start, "probe_loss_end": result.probe_end,
            "resumed_from_step": result.resumed_from, "completed_at": utc_now_iso(),
        }
        try:  # a failing store: retryable, the last checkpoint stays for the retry
            info = await asyncio.to_thread(
                register_lora, self._registry, folder, spec, result.state.weights,
                dtype=self._lora_dtype, base_model=self._base_model, training=training)
        except StorageError as exc:
            raise unavailable(exc) from exc
        url = await self._validation_image(spec, info.lora_id)
        if url is not None:
            training["validation_image_url"] = url
            try:
                info = await asyncio.to_thread(
                    self._registry.register, info.lora_id, info.path,
                    trigger_word=spec.trigger_word, base_model=self._base_model,
                    training=training, replace=True)
            except StorageError as exc:  # registered already: only the URL is missing
                logger.warning("request_id=%s validation image of %s not recorded: %s",
                               spec.request_id, info.lora_id, exc)
        return info

    async def _validation_image(self, spec: TrainingSpec, lora_id: str) -> str | None:
        request = ImageRequested(
            request_id=f"{spec.training_id}-validation",
            conversation_id=spec.conversation_id or spec.character_id,
            character_id=spec.character_id, prompt=spec.caption, character_lora_id=lora_id,
            width=spec.resolution, height=spec.resolution, seed=0, optimize_prompt=False,
        )
        try:
            return (await self._images.generate(request)).url
        except EngineError as exc:  # the LoRA is registered and usable; say so and go on
            logger.warning("request_id=%s validation image of %s failed: %s %s",
                           spec.request_id, lora_id, exc.code, exc)
            return None
