"""A training's inputs: found in its folder from an earlier attempt, restored from the
shared store (another instance began it or went on with it), or taken in from its request
(checked in memory by :class:`~core.training.intake.Intake`, then written); and their
copies in the store (the photos, each checkpoint) kept as the training goes.

A store that fails while a training is restored from it is a retryable
``UPSTREAM_UNAVAILABLE``, never a fresh start (that would delete its checkpoint there).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from core.storage import StorageError, unavailable
from core.training.checkpoint import TrainingFolder
from core.training.intake import Intake
from core.training.shared import SharedTrainings
from core.training.spec import Origin, TrainingSpec
from schemas.errors import InternalError
from schemas.events import LoraTrainingRequested

__all__ = ["TrainingInputs"]

logger = logging.getLogger(__name__)


class TrainingInputs:
    """Inputs checked by ``intake``, kept in ``shared`` too when there is a shared store.
    Called holding the training's lock."""

    def __init__(self, intake: Intake, shared: SharedTrainings | None) -> None:
        self._intake = intake
        self._shared = shared

    async def prepare(self, request: LoraTrainingRequested, origin: Origin,
                      folder: TrainingFolder, files: Sequence[Path]) -> TrainingSpec:
        """The spec of ``request``'s training with its inputs in ``folder``: those found
        there, else those in the store when it holds them (or a later checkpoint), else
        ``request``'s, checked and written (``files``: its uploaded images). Raises
        :class:`~schemas.errors.InvalidRequestError` (nothing written),
        :class:`~schemas.errors.UpstreamUnavailableError` (an image URL, the store) or
        :class:`~schemas.errors.InternalError` (the local disk)."""
        spec = await asyncio.to_thread(folder.read_spec)
        if self._shared is not None and (spec is None or await self._behind(folder)):
            spec = await self._restored(folder)
        if spec is not None and spec.request_id == request.request_id:
            logger.info("request_id=%s training %s found on disk",
                        request.request_id, folder.path.name)
            return spec
        return await self._take_in(request, origin, folder, files)

    def checkpointed(self, folder: TrainingFolder) -> Callable[[int], Awaitable[None]] | None:
        """What the runner awaits after each checkpoint: its copy in the store (None
        without one). A store that fails is logged; the training goes on (the checkpoint
        is on disk)."""
        shared = self._shared
        if shared is None:
            return None

        async def upload(step: int) -> None:
            try:
                await asyncio.to_thread(shared.save_checkpoint, folder, step)
            except OSError as exc:
                logger.warning("checkpoint %d of training %s not kept in the store: %s",
                               step, folder.path.name, exc)

        return upload

    async def discard(self, training_id: str) -> None:
        """Deletes the training's inputs and checkpoints from the store (its status stays);
        a store that fails is logged."""
        if self._shared is None:
            return
        try:
            await asyncio.to_thread(self._shared.discard, training_id)
        except OSError as exc:
            logger.warning("inputs of training %s left in the store: %s", training_id, exc)

    async def _behind(self, folder: TrainingFolder) -> bool:
        """Whether the store holds a later checkpoint than this folder (another instance
        went on with the training since this one left it). Raises
        :class:`~schemas.errors.UpstreamUnavailableError` when the store fails: going on
        from the local checkpoint would throw a later one away."""
        assert self._shared is not None
        try:
            stored = await asyncio.to_thread(self._shared.checkpoint_step,
                                             folder.path.name)
        except StorageError as exc:
            raise unavailable(exc) from exc
        return stored is not None and stored > await asyncio.to_thread(folder.latest_step)

    async def _restored(self, folder: TrainingFolder) -> TrainingSpec | None:
        """The spec of the training's inputs and checkpoint brought from the store (another
        instance began it or went on with it), or None when the store has none. Whatever
        the folder held is replaced. A store that fails (or a checkpoint replaced while it
        was read) raises :class:`~schemas.errors.UpstreamUnavailableError`: retryable,
        and nothing in the store is touched (starting over would delete its checkpoint)."""
        assert self._shared is not None
        await asyncio.to_thread(folder.remove)
        try:
            step = await asyncio.to_thread(self._shared.restore, folder)
        except StorageError as exc:
            await asyncio.to_thread(folder.remove)
            raise unavailable(exc) from exc
        except OSError as exc:  # the local disk's
            await asyncio.to_thread(folder.remove)
            raise InternalError(f"training {folder.path.name} could not be restored from "
                                f"the store: {exc}") from exc
        if step is None:
            return None
        return await asyncio.to_thread(folder.read_spec)

    async def _take_in(self, request: LoraTrainingRequested, origin: Origin,
                       folder: TrainingFolder, files: Sequence[Path]) -> TrainingSpec:
        spec, images = await self._intake.take(request, origin, files)  # raises before writing
        try:
            await asyncio.to_thread(folder.remove)  # another request's leftovers, if any
            await asyncio.to_thread(folder.write_inputs, spec, images)
            if self._shared is not None:  # the photos, kept for whoever resumes it
                await asyncio.to_thread(self._shared.save_inputs, folder)
        except StorageError as exc:
            await asyncio.to_thread(folder.remove)
            raise unavailable(exc) from exc
        except OSError as exc:
            await asyncio.to_thread(folder.remove)
            raise InternalError(f"training inputs could not be written: {exc}") from exc
        logger.info("request_id=%s training %s accepted: %d images, %d steps, lr %g, %dpx",
                    spec.request_id, spec.training_id, spec.image_count, spec.steps,
                    spec.learning_rate, spec.resolution)
        return spec
