"""What the HTTP app needs, handed to its factory (typed app state)."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from core.health import EngineHealth
from core.image.service import ImageService
from core.metrics import EngineMetrics
from core.outputs import OutputStore
from core.training import TrainingService
from core.voice import VoiceService
from schemas.codec import EventCodec

__all__ = ["SERVICES", "AppServices"]


@dataclass
class AppServices:
    """Filled in at start-up; ``image`` arrives once the model is loaded."""

    health: EngineHealth
    metrics: EngineMetrics
    store: OutputStore
    codec: EventCodec
    voice: VoiceService
    image: ImageService | None = None
    training: TrainingService | None = None


SERVICES: web.AppKey[AppServices] = web.AppKey("services", AppServices)
