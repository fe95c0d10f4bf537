"""The scheduling parts one engine shares between Kafka and HTTP, built from settings."""

from __future__ import annotations

from dataclasses import dataclass

from core.metrics import EngineMetrics
from core.scheduling.admission import Admission
from core.scheduling.pending import PendingRequests
from core.scheduling.placement import Priority
from core.settings import Settings

__all__ = ["Scheduling", "build_scheduling"]


@dataclass(frozen=True)
class Scheduling:
    """Admission (slots per kind and conversation), the pending requests (cancels,
    deadlines) and the age from which an unmarked record counts as a replay."""

    admission: Admission
    pending: PendingRequests
    replay_age: float = 600.0


def build_scheduling(settings: Settings, metrics: EngineMetrics | None = None) -> Scheduling:
    def observe_wait(kind: str, priority: Priority, seconds: float) -> None:
        if metrics is not None:
            metrics.queue_wait.labels(kind, priority.value).observe(seconds)

    def set_depth(kind: str, priority: Priority, depth: int) -> None:
        if metrics is not None:
            metrics.queue_depth.labels(kind, priority.value).set(depth)

    admission = Admission(
        {"image": settings.max_in_flight_image, "voice": settings.max_in_flight_voice,
         "lora": settings.max_in_flight_lora},
        per_owner=settings.max_in_flight_per_conversation)
    pending = PendingRequests(remember_seconds=settings.cancel_memory_seconds,
                              on_queue_wait=observe_wait, on_depth=set_depth)
    return Scheduling(admission, pending, settings.replay_age_seconds)
