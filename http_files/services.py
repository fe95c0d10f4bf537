"""What the HTTP app needs, handed to its factory (typed app state)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from core.health import EngineHealth
from core.image.service import ImageService
from core.metrics import EngineMetrics
from core.outputs import OutputStore
from core.scheduling import ReadBarrier, Scheduling
from core.training import TrainingService
from core.voice import VoiceService
from schemas.codec import EventCodec

__all__ = ["SERVICES", "AppServices"]


@dataclass
class AppServices:
    """Filled in at start-up; ``image`` arrives once the model is loaded, and
    ``broadcast_cancel(conversation_id, request_id)`` (publishes a cancel on
    ``generation.control`` for every instance) and ``read_barrier`` (requests wait for the
    cancels published before them) once Kafka is up."""

    health: EngineHealth
    metrics: EngineMetrics
    store: OutputStore
    codec: EventCodec
    voice: VoiceService
    scheduling: Scheduling
    image: ImageService | None = None
    training: TrainingService | None = None
    broadcast_cancel: Callable[[str, str | None], Awaitable[None]] | None = None
    read_barrier: ReadBarrier | None = None


SERVICES: web.AppKey[AppServices] = web.AppKey("services", AppServices)
