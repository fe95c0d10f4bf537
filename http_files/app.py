"""The aiohttp application factory: routes only; services come in through the factory."""

from __future__ import annotations

from aiohttp import web

from http_files.health import health
from http_files.image import generate_image
from http_files.metrics import metrics
from http_files.outputs import get_output
from http_files.requests import cancel_request
from http_files.services import SERVICES, AppServices
from http_files.train import get_training, train_lora
from http_files.voice import generate_voice

__all__ = ["create_app"]

_MAX_BODY = 1 * 2**20  # JSON requests. /train-lora streams its multipart body part by part
# with its own limits (MAX_LORA_IMAGES x LORA_MAX_IMAGE_BYTES), which this one does not bind


def create_app(services: AppServices) -> web.Application:
    """Builds the HTTP app: ``/health``, ``/outputs/{filename}``, ``/metrics`` and the
    original API's POST endpoints, all backed by ``services``."""
    app = web.Application(client_max_size=_MAX_BODY)
    app[SERVICES] = services
    app.router.add_get("/health", health)
    app.router.add_get("/outputs/{filename}", get_output)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/generate/voice", generate_voice)
    app.router.add_post("/generate/image", generate_image)
    app.router.add_post("/train-lora", train_lora)
    app.router.add_get("/train-lora/{training_id}", get_training)
    app.router.add_delete("/requests/{request_id}", cancel_request)
    return app
