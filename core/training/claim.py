"""An HTTP training claimed in the shared store before its photos are taken in, so that
the same POST reaching two instances at once, or a retry reaching another, is trained
once: the other answers the live status.

The claim is the training's status, created conditionally (:meth:`SharedTrainings.claim`);
one that is not live (finished, failed, not renewed for
:data:`~core.training.lease.STATUS_LEASE_SECONDS`) is taken over. While the claimed
training is taken in, its claim is renewed as the heartbeat renews running statuses; one
never started is let go. A store that fails while claiming is a retryable
``UPSTREAM_UNAVAILABLE``: whether another instance is at it is unknown. Without a shared
store nothing is claimed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace as replaced

from core.storage import StorageError, unavailable
from core.training.estimate import StepTimes
from core.training.intake import spec_identity
from core.training.lease import STATUS_LEASE_SECONDS
from core.training.shared import SharedTrainings
from core.training.spec import TrainingLimits
from core.training.status import TrainingStatus
from schemas.errors import EngineError
from schemas.events import LoraTrainingRequested, utc_now_iso

__all__ = ["Claims"]

logger = logging.getLogger(__name__)


class Claims:
    """Claims of HTTP trainings in ``shared`` (none without it) as ``owner``'s; a claim
    estimates its training from ``limits``' defaults and ``times``."""

    def __init__(self, shared: SharedTrainings | None, owner: str, *,
                 limits: TrainingLimits, times: StepTimes) -> None:
        self._shared = shared
        self._owner = owner
        self._limits = limits
        self._times = times

    def status_for(self, request: LoraTrainingRequested) -> TrainingStatus | None:
        """The status that claims ``request``'s training in the store (None without one):
        queued at step 0 until its inputs are known."""
        if self._shared is None:
            return None
        limits = self._limits
        steps = request.steps or limits.default_steps
        return TrainingStatus(
            training_id=spec_identity(request), request_id=request.request_id,
            character_id=request.character_id, trigger_word=request.trigger_word,
            state="queued", step=0, total=steps, updated_at=utc_now_iso(),
            estimated_time_minutes=self._times.estimate_minutes(
                steps, request.resolution or limits.default_resolution, limits.batch_size))

    async def claim(self, status: TrainingStatus) -> TrainingStatus | None:
        """Claims the HTTP training of ``status`` in the store for this instance (None);
        the live status of the instance at it instead. Raises
        :class:`~schemas.errors.UpstreamUnavailableError` when the store fails (whether
        another instance is at it is unknown: not started here)."""
        assert self._shared is not None
        try:
            found = await asyncio.to_thread(self._shared.claim, status, self._owner, "http",
                                            lease=STATUS_LEASE_SECONDS)
        except StorageError as exc:
            raise unavailable(exc) from exc
        return found.status if found is not None else None

    async def claimed_elsewhere(self, queued: TrainingStatus) -> bool:
        """At start-up, for an HTTP training found on disk (``queued``: its status):
        whether another instance is at it (its claim live); a store that fails says no
        (logged: this one goes on as if alone, as without a store)."""
        if self._shared is None:
            return False
        status = replaced(queued, updated_at=utc_now_iso())
        try:
            return await self.claim(status) is not None
        except EngineError as exc:
            logger.warning("training %s not claimed in the store: %s", status.training_id,
                           exc)
            return False

    @asynccontextmanager
    async def renewing(self, claim: TrainingStatus | None) -> AsyncIterator[None]:
        """While the claimed training is taken in (checking and uploading its photos may
        outlast the lease), its claim is renewed as the heartbeat renews running ones; if
        it is never started (refused, failed), the claim is let go: a retryable failure
        is recorded (any instance may take the training over), anything else removes it.
        Nothing with ``claim`` None."""
        if claim is None:
            yield
            return
        shared = self._shared
        assert shared is not None

        stop = asyncio.Event()

        async def renew() -> None:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), STATUS_LEASE_SECONDS / 4)
                    return
                try:
                    await asyncio.to_thread(shared.put_status, replaced(
                        claim, updated_at=utc_now_iso()), self._owner, "http")
                except OSError as exc:
                    logger.warning("claim of training %s not renewed: %s",
                                   claim.training_id, exc)

        async def stop_renewing() -> None:
            # stopped between writes, never cancelled mid-write: a renewal written from its
            # thread after the claim was let go would bring a live claim back
            stop.set()
            await asyncio.gather(renewing, return_exceptions=True)

        renewing = asyncio.create_task(renew(), name=f"training-claim-{claim.training_id}")
        try:
            yield
        except BaseException as exc:
            await stop_renewing()
            await self._let_go(claim, exc)
            raise
        finally:
            await stop_renewing()

    async def _let_go(self, claim: TrainingStatus, error: BaseException) -> None:
        assert self._shared is not None
        try:
            if isinstance(error, EngineError) and error.retryable:
                await asyncio.to_thread(self._shared.put_status, replaced(
                    claim, state="failed", error_code=str(error.code),
                    error=error.public_message, retryable=True, estimated_time_minutes=None,
                    updated_at=utc_now_iso()), self._owner, "http")
            else:
                await asyncio.to_thread(self._shared.drop_status, claim.training_id)
        except OSError as exc:
            logger.warning("claim of training %s not let go: %s", claim.training_id, exc)
