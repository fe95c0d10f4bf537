"""Admission of ``POST /train-lora``: a new training is taken only while this instance has
fewer than MAX_IN_FLIGHT_LORA trainings in progress (running or queued, Kafka and HTTP
alike); one more is answered 503 with ``Retry-After``, as a full kind is for the other POSTs.

A request for a training already in progress here, or already registered, is no new
training: it is answered as before (joined, or the finished result). The gate is asked twice:
before the first image of the body is stored (with the fields sent before the images; a
``request_id`` sent after them is not known then, so the request counts as a new training),
and again just before the training is started, where the check and a reservation of the
training's place are made together, so two uploads finishing at once cannot both take the
last place. A request refused is not started: nothing accepted is lost.

``Retry-After`` is the time left of the soonest-ending training in progress (from the step
time estimate in its status), at least 5 s and at most 10 minutes: a slot may free sooner
(a training that fails), and a client should not be told to wait for hours.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from core.training import TrainingService

__all__ = ["TrainingGate", "TrainingsFull"]

_MIN_RETRY_AFTER = 5
_MAX_RETRY_AFTER = 600


class TrainingsFull(Exception):
    """As many trainings as allowed are in progress here: try again in ``retry_after``
    seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TrainingGate:
    """At most ``limit`` trainings in progress on this instance; from the event loop only."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"MAX_IN_FLIGHT_LORA must be >= 1, got {limit}")
        self.limit = limit
        self._starting: set[str] = set()  # admitted, not yet among the service's trainings

    async def check(self, training: TrainingService, training_id: str | None) -> None:
        """Raises :class:`TrainingsFull` when ``training_id`` (None: not known yet, so a new
        one) would be a new training and this instance has no place for it."""
        if not self._has_place(training, training_id):
            await self._refuse_unless_registered(training, training_id)

    @asynccontextmanager
    async def starting(self, training: TrainingService, training_id: str
                       ) -> AsyncIterator[None]:
        """Holds a place for ``training_id`` while it is being started (until it is among
        the service's trainings, or refused). Raises :class:`TrainingsFull` as
        :meth:`check` does."""
        if not self._has_place(training, training_id):
            await self._refuse_unless_registered(training, training_id)
            yield  # registered: a replay starts nothing, so it takes no place
            return
        reserved = training_id not in self._starting
        self._starting.add(training_id)  # with the check, no await between them
        try:
            yield
        finally:
            if reserved:
                self._starting.discard(training_id)

    def _has_place(self, training: TrainingService, training_id: str | None) -> bool:
        busy = training.in_progress | self._starting
        return training_id in busy or len(busy) < self.limit

    async def _refuse_unless_registered(self, training: TrainingService,
                                        training_id: str | None) -> None:
        if training_id is not None:
            status = await training.status(training_id)
            if status is not None and status.state == "completed":
                return
        busy = training.in_progress | self._starting
        raise TrainingsFull(
            f"{len(busy)} trainings are in progress on this instance "
            f"(MAX_IN_FLIGHT_LORA={self.limit})", await _retry_after(training, busy))


async def _retry_after(training: TrainingService, busy: frozenset[str] | set[str]) -> int:
    """From the running trainings' time left (the queued ones wait for them), or else the
    queued ones' own times."""
    running: list[int] = []
    queued: list[int] = []
    for training_id in busy:
        status = await training.status(training_id)
        if status is not None and status.estimated_time_minutes is not None:
            (running if status.state == "training" else queued).append(
                status.estimated_time_minutes)
    minutes = running or queued
    seconds = 60 * min(minutes) if minutes else _MIN_RETRY_AFTER
    return max(_MIN_RETRY_AFTER, min(_MAX_RETRY_AFTER, seconds))
