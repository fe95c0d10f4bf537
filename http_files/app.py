"""The aiohttp application factory: routes only; services come in through the factory."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import web

from http_files.auth import AccessPolicy, require_api_key
from http_files.health import health, live, ready
from http_files.image import generate_image
from http_files.metrics import metrics
from http_files.openapi import serve_openapi
from http_files.outputs import get_output
from http_files.requests import cancel_request
from http_files.schemas import get_schema
from http_files.sending import DEFAULT_WRITE_TIMEOUT, WRITE_TIMEOUT
from http_files.services import SERVICES, AppServices
from http_files.streams import get_stream
from http_files.train import get_training, train_lora
from http_files.uploads import UPLOADS, UploadLimits, Uploads
from http_files.validation import JSON_BODY_LIMIT
from http_files.voice import generate_voice

__all__ = ["create_app"]


def create_app(services: AppServices, uploads: UploadLimits | None = None,
               access: AccessPolicy | None = None, *,
               write_timeout: float = DEFAULT_WRITE_TIMEOUT) -> web.Application:
    """Builds the HTTP app: ``/health`` and its probes, ``/outputs/{filename}``,
    ``/metrics``, ``/schemas/{fingerprint}`` and the original API's POST endpoints, all
    backed by ``services``;
    ``/train-lora`` uploads are received under ``uploads`` (``upload_limits(settings)``;
    the defaults when None); API keys are required as ``access`` says
    (``access_policy(settings)``; None or no keys: the app is open). A client that takes
    no block of a file (``/outputs``, a replayed voice file) for ``write_timeout`` seconds
    has its connection reset (:mod:`http_files.sending`); raises ``ValueError`` for one
    not above 0.

    JSON bodies may have JSON_BODY_LIMIT bytes (the app's ``client_max_size``);
    ``/train-lora`` streams its multipart body with its own limits, which that one does
    not bind."""
    if not write_timeout > 0:
        raise ValueError(f"write_timeout must be > 0 seconds, got {write_timeout}")
    access = access or AccessPolicy()
    app = web.Application(client_max_size=JSON_BODY_LIMIT,
                          middlewares=[require_api_key(access)] if access.enabled else [])
    app[SERVICES] = services
    app[WRITE_TIMEOUT] = write_timeout
    app[UPLOADS] = Uploads(uploads or UploadLimits())
    app.cleanup_ctx.append(_uploads_cleared)
    app.router.add_get("/health", health)
    app.router.add_get("/health/live", live)
    app.router.add_get("/health/ready", ready)
    app.router.add_get("/outputs/{filename}", get_output)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/generate/voice", generate_voice)
    app.router.add_get("/streams/voice/{instance}/{stream_id}", get_stream)
    app.router.add_post("/generate/image", generate_image)
    app.router.add_post("/train-lora", train_lora)
    app.router.add_get("/train-lora/{training_id}", get_training)
    app.router.add_delete("/requests/{request_id}", cancel_request)
    app.router.add_get("/openapi.json", serve_openapi())
    app.router.add_get("/schemas/{fingerprint}", get_schema)
    return app


async def _uploads_cleared(app: web.Application) -> AsyncIterator[None]:
    """Before serving: make the uploads folder, emptied of what a crashed process left."""
    await asyncio.to_thread(app[UPLOADS].prepare)
    yield
