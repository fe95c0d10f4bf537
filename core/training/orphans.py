"""Training folders nobody works on, removed so that nothing grows without bound.

A training folder nobody works on for ``orphan_ttl`` seconds (default
:data:`ORPHAN_TTL_SECONDS`, a day) is removed: at start-up (with the folders of incomplete
inputs and of registered trainings: :meth:`OrphanSweeper.resumable`) and then at most
every ``orphan_ttl / 4`` seconds when a request comes (:meth:`OrphanSweeper.sweep_when_due`).
Such a folder belongs to a request that went to another instance or was abandoned; a
younger one may still resume (HTTP ones at start-up, Kafka ones when redelivered) and is
kept. A folder that a request is working on (running here, or its lock held or waited
for) is left alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Container

from core.lora.registry import LoraRegistry
from core.training.checkpoint import TrainingStore
from core.training.locks import KeyedLocks
from core.training.register import find_registered
from core.training.spec import TrainingSpec
from core.training.status import StatusBoard

__all__ = ["ORPHAN_TTL_SECONDS", "OrphanSweeper"]

ORPHAN_TTL_SECONDS = 24 * 3600.0

logger = logging.getLogger(__name__)


class OrphanSweeper:
    """Removes the orphaned folders of ``store`` (see the module docstring): those of
    trainings not in ``running`` nor locked in ``locks``; a removed one's status is
    forgotten on ``board``; ``registry`` says which trainings registered their LoRA."""

    def __init__(self, store: TrainingStore, registry: LoraRegistry, board: StatusBoard,
                 locks: KeyedLocks, running: Container[str], *,
                 orphan_ttl: float = ORPHAN_TTL_SECONDS) -> None:
        if orphan_ttl <= 0:
            raise ValueError(f"orphan_ttl must be > 0, got {orphan_ttl}")
        self._store = store
        self._registry = registry
        self._board = board
        self._locks = locks
        self._running = running
        self._orphan_ttl = orphan_ttl
        self._swept_at = time.monotonic()
        self._sweeping: asyncio.Task[list[str]] | None = None

    def swept_now(self) -> None:
        """The folders are being looked at now (start-up): the next sweep is due in
        ``orphan_ttl / 4`` seconds."""
        self._swept_at = time.monotonic()

    async def remove_orphans(self) -> list[str]:
        """Remove the folders of trainings not running here and idle for ``orphan_ttl``
        seconds (ids returned); a folder a request is working on is left alone."""
        self._swept_at = time.monotonic()
        removed: list[str] = []
        for training_id in await asyncio.to_thread(self._store.training_ids):
            if training_id in self._running or self._locks.busy(training_id):
                continue
            async with self._locks.hold(training_id):
                folder = self._store.folder(training_id)
                if await asyncio.to_thread(folder.idle_seconds) > self._orphan_ttl:
                    await self._remove(training_id, "an orphan: idle for more than "
                                       f"{self._orphan_ttl:g} s")
                    removed.append(training_id)
        return removed

    async def resumable(self, training_id: str) -> TrainingSpec | None:
        """The spec of a folder found at start-up, or None after removing the folder
        (incomplete, registered or orphaned). Called holding the training's lock."""
        folder = self._store.folder(training_id)
        spec = await asyncio.to_thread(self._store.complete_spec, training_id)
        if spec is None:
            await self._remove(training_id, "no complete training inputs")
        elif await self._registered_or_unknown(training_id):
            await self._remove(training_id, "registered already")
        elif await asyncio.to_thread(folder.idle_seconds) > self._orphan_ttl:
            await self._remove(training_id, "an orphan: idle for more than "
                               f"{self._orphan_ttl:g} s")
        else:
            return spec
        return None

    def sweep_when_due(self) -> None:
        """Start :meth:`remove_orphans` in the background every ``orphan_ttl / 4`` s."""
        due = time.monotonic() - self._swept_at > self._orphan_ttl / 4
        if due and (self._sweeping is None or self._sweeping.done()):
            self._swept_at = time.monotonic()
            self._sweeping = asyncio.create_task(self.remove_orphans(),
                                                 name="training-orphans")
            self._sweeping.add_done_callback(_log_sweep)

    def sweeping(self) -> list[asyncio.Task[list[str]]]:
        """The background sweep, if one was started (to wait for at shutdown)."""
        return [self._sweeping] if self._sweeping is not None else []

    async def _registered_or_unknown(self, training_id: str) -> bool:
        """Whether ``training_id`` registered its LoRA; a store that fails says nothing,
        so the folder is kept (False)."""
        try:
            return await asyncio.to_thread(find_registered, self._registry,
                                           training_id) is not None
        except OSError as exc:
            logger.warning("training %s not looked up in the store: %s", training_id, exc)
            return False

    async def _remove(self, training_id: str, why: str) -> None:
        logger.info("removing training folder %s: %s", training_id, why)
        await asyncio.to_thread(self._store.folder(training_id).remove)
        self._board.forget(training_id)


def _log_sweep(task: asyncio.Task[list[str]]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("removing orphaned training folders failed", exc_info=task.exception())
