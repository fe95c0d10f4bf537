"""The statuses of this instance's trainings in the shared store, held under a lease.

A training running or waiting here has its status written to the store at every change
(:meth:`SharedStatuses.write`) and again every quarter of :data:`STATUS_LEASE_SECONDS`
while it runs or waits (:meth:`SharedStatuses.keep_fresh`: its heartbeat; a checkpoint
may take far longer than that). A status not renewed for :data:`STATUS_LEASE_SECONDS`
belongs to an instance that is gone: read back (:meth:`SharedStatuses.read`) it is
reported as ``failed`` (retryable) for an HTTP training, ``queued`` for a Kafka one
(Kafka redelivers it); a retried POST takes an HTTP one over from its last checkpoint in
the store (:mod:`core.training.claim`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import replace as replaced

from core.training.shared import SharedTrainings
from core.training.spec import Origin
from core.training.status import TrainingStatus

__all__ = ["STATUS_LEASE_SECONDS", "SharedStatuses"]

# a status in the store not renewed for this long belongs to nobody (its instance is gone);
# its owner renews it every quarter of this (a checkpoint may take far longer than that)
STATUS_LEASE_SECONDS = 120.0

logger = logging.getLogger(__name__)


class SharedStatuses:
    """Statuses of trainings in ``shared``, written as ``owner``'s (see the module
    docstring). Used from the event loop only."""

    def __init__(self, shared: SharedTrainings, owner: str) -> None:
        self._shared = shared
        self._owner = owner
        self._writes: dict[str, asyncio.Task[None]] = {}  # one writer per training
        self._unwritten: dict[str, tuple[TrainingStatus, Origin]] = {}  # not yet written
        self._heartbeat: asyncio.Task[None] | None = None  # keeps running statuses fresh

    async def read(self, training_id: str) -> TrainingStatus | None:
        """The status another instance wrote to the store (a training running there); a
        queued or running one not renewed for :data:`STATUS_LEASE_SECONDS` is abandoned
        (its instance is gone): ``queued`` again for a Kafka training (its request is
        redelivered), ``failed`` and retryable for an HTTP one (nothing would resume it
        but a retried POST, which takes it over from its last checkpoint). None when the
        store has none, or fails (logged)."""
        try:
            found = await asyncio.to_thread(self._shared.get_status, training_id)
        except OSError as exc:
            logger.warning("status of training %s not read from the store: %s",
                           training_id, exc)
            return None
        if found is None:
            return None
        status = found.status
        if status.state not in ("queued", "training") or found.live(STATUS_LEASE_SECONDS):
            return status
        if found.origin == "kafka":
            return replaced(status, state="queued")
        return replaced(
            status, state="failed", error_code="TIMEOUT", retryable=True,
            estimated_time_minutes=None,
            error=f"the instance running this training stopped (its status was not "
                  f"renewed for {STATUS_LEASE_SECONDS:g} s); POST /train-lora again with the "
                  "same request_id to resume it from its last checkpoint")

    def write(self, status: TrainingStatus, origin: Origin) -> None:
        """Writes ``status`` of a training running here to the store in the background:
        one write per training at a time, the latest status winning (a burst of progress
        is one or two writes). A write that fails is logged."""
        training_id = status.training_id
        self._unwritten[training_id] = (status, origin)
        if training_id not in self._writes:
            self._writes[training_id] = asyncio.get_running_loop().create_task(
                self._write(training_id), name=f"training-status-{training_id}")

    def keep_fresh(self, running: Callable[[], bool], renew: Callable[[], None]) -> None:
        """Starts the heartbeat unless it beats already: while ``running()``, ``renew()``
        (which writes every status again) each quarter of :data:`STATUS_LEASE_SECONDS`,
        so that a training queued behind another one for hours, or in a chunk longer than
        the lease, is not taken for abandoned by another instance."""
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.create_task(self._beat(running, renew),
                                                  name="training-status-heartbeat")

    async def close(self) -> None:
        """Stops the heartbeat, then waits until the last statuses (queued: resumable)
        reach the store."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        await asyncio.gather(*self._writes.values(), return_exceptions=True)

    async def _beat(self, running: Callable[[], bool], renew: Callable[[], None]) -> None:
        while running():
            await asyncio.sleep(STATUS_LEASE_SECONDS / 4)
            renew()

    async def _write(self, training_id: str) -> None:
        try:
            while (latest := self._unwritten.pop(training_id, None)) is not None:
                status, origin = latest
                try:
                    await asyncio.to_thread(self._shared.put_status, status, self._owner,
                                            origin)
                except OSError as exc:
                    logger.warning("status of training %s not written to the store: %s",
                                   training_id, exc)
        finally:
            del self._writes[training_id]
