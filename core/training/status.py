"""What ``GET /train-lora/{training_id}`` reports: one :class:`TrainingStatus` per training.

States: ``queued`` (accepted, waiting for the GPU or for a resume after a restart),
``training``, ``completed``, ``failed``. The board lives in memory; after a restart the
service rebuilds a status from the registry (completed) or the checkpoint folder (queued).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from schemas.events import utc_now_iso

__all__ = ["State", "StatusBoard", "TrainingStatus"]

State = Literal["queued", "training", "completed", "failed"]


@dataclass(frozen=True)
class TrainingStatus:
    """A snapshot. ``loss`` is the smoothed training loss; ``error_code``/``error`` are set
    when failed; ``lora_id`` and ``validation_image_url`` when completed."""

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

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class StatusBoard:
    """Statuses by training id; used from the event loop only."""

    def __init__(self) -> None:
        self._statuses: dict[str, TrainingStatus] = {}

    def get(self, training_id: str) -> TrainingStatus | None:
        return self._statuses.get(training_id)

    def put(self, status: TrainingStatus) -> TrainingStatus:
        status = replace(status, updated_at=utc_now_iso())
        self._statuses[status.training_id] = status
        return status

    def update(self, training_id: str, **changes: Any) -> TrainingStatus | None:
        """Change fields of a known status (None when unknown)."""
        current = self._statuses.get(training_id)
        return None if current is None else self.put(replace(current, **changes))
