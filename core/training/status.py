"""What ``GET /train-lora/{training_id}`` reports: one :class:`TrainingStatus` per training.

States: ``queued`` (accepted, waiting for the GPU or for a resume after a restart),
``training``, ``completed``, ``failed``. The board lives in memory; after a restart the
service rebuilds a status from the registry (completed) or the checkpoint folder (queued).

The board is bounded: a status the service does not ``keep`` (a training not running
here) is dropped once untouched for ``ttl`` seconds (default a day), and the least recently
touched ones beyond ``max_entries`` (default 1000) go first. A dropped completed or queued
status is rebuilt on demand as above; a dropped failed one is unknown (404) from then on.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from pydantic import computed_field

from schemas.events import utc_now_iso

__all__ = ["MAX_STATUSES", "STATUS_TTL_SECONDS", "State", "StatusBoard", "TrainingStatus"]

State = Literal["queued", "training", "completed", "failed"]

STATUS_TTL_SECONDS = 24 * 3600.0
MAX_STATUSES = 1000


@dataclass(frozen=True)
class TrainingStatus:
    """A snapshot. ``status`` (also under ``state``) is ``queued``, ``training``,
    ``completed`` or ``failed``; ``POST /train-lora`` answers ``training_started`` instead
    for a training it accepted, as the original API does. ``loss`` is the smoothed training
    loss; ``error_code``/``error`` are set when failed; ``lora_id`` and
    ``validation_image_url`` when completed."""

    training_id: str
    request_id: str
    character_id: str
    trigger_word: str
    state: State
    step: int
    total: int
    loss: float | None = None
    lora_id: str | None = None
    validation_image_url: str | None = None
    error_code: str | None = None
    error: str | None = None
    retryable: bool | None = None
    estimated_time_minutes: int | None = None
    updated_at: str = ""

    @computed_field  # type: ignore[prop-decorator]  # pydantic's documented form
    @property
    def status(self) -> State:
        """``state``, under the name ``POST /train-lora`` answers under (there
        ``training_started`` for an accepted training, ``completed`` for a finished one)."""
        return self.state

    def to_json(self) -> dict[str, Any]:
        """The snapshot as ``GET /train-lora/{training_id}`` answers it: every field, and
        :attr:`status`."""
        return {**asdict(self), "status": self.status}


class StatusBoard:
    """Statuses by training id, bounded as the module docstring says; ``keep(training_id)``
    says which are never dropped (running ones). Used from the event loop only."""

    def __init__(self, keep: Callable[[str], bool], *, ttl: float = STATUS_TTL_SECONDS,
                 max_entries: int = MAX_STATUSES,
                 clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[TrainingStatus], None] | None = None) -> None:
        if ttl <= 0 or max_entries < 1:
            raise ValueError(f"ttl must be > 0 and max_entries >= 1, got {ttl}, {max_entries}")
        self._keep = keep
        self._ttl = ttl
        self._max = max_entries
        self._clock = clock
        self._on_change = on_change  # told of every status put (the shared store's copy)
        self._statuses: OrderedDict[str, tuple[TrainingStatus, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._statuses)

    def get(self, training_id: str) -> TrainingStatus | None:
        self._prune()
        entry = self._statuses.get(training_id)
        return None if entry is None else entry[0]

    def put(self, status: TrainingStatus) -> TrainingStatus:
        status = replace(status, updated_at=utc_now_iso())
        self._statuses[status.training_id] = (status, self._clock())
        self._statuses.move_to_end(status.training_id)
        self._prune()
        if self._on_change is not None:
            self._on_change(status)
        return status

    def update(self, training_id: str, **changes: Any) -> TrainingStatus | None:
        """Change fields of a known status (None when unknown)."""
        entry = self._statuses.get(training_id)
        return None if entry is None else self.put(replace(entry[0], **changes))

    def forget(self, training_id: str) -> None:
        """Drop the status of ``training_id`` (its folder was removed)."""
        self._statuses.pop(training_id, None)

    def _prune(self) -> None:
        """Oldest first: drop what is expired or beyond the bound, unless kept."""
        now = self._clock()
        for training_id, (_, touched) in list(self._statuses.items()):
            if len(self._statuses) <= self._max and now - touched < self._ttl:
                break  # this one and every later one is fresh
            if not self._keep(training_id):
                del self._statuses[training_id]
