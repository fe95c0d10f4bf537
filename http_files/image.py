"""POST /generate/image: the original API's request and response, on the image core.

The JSON body is the ImageRequested event (``init_image`` as base64, within the 1 MiB
JSON body limit: larger starting images go by ``init_image_url``); the response adds
``images`` when the request made several (``num_images``)."""

from __future__ import annotations

from dataclasses import replace

from aiohttp import web

from http_files.errors import error_response
from http_files.scheduled import run_scheduled, scheduling_owner
from http_files.services import SERVICES
from http_files.validation import read_event
from schemas.errors import EngineError
from schemas.events import ImageRequested

__all__ = ["generate_image"]


async def generate_image(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    if services.image is None:
        return web.json_response(
            {"error_code": "INTERNAL", "message": "no image model is loaded", "retryable": True},
            status=503)
    event = await read_event(request, services.codec, ImageRequested)
    image = services.image
    try:
        result = await run_scheduled(
            services, "image", event,
            lambda pending: image.generate(event, placement=replace(
                pending.placement(),
                owner=scheduling_owner(event.conversation_id, event.request_id))))
    except EngineError as exc:
        return error_response(exc)
    body: dict[str, object] = {
        "image_id": result.image_id, "filename": result.filename, "prompt": result.prompt,
        "width": result.width, "height": result.height, "url": result.url,
        "timestamp": result.timestamp, "seed": result.seed, "model": result.model,
        "development_model": result.development_model,
    }
    if result.images:  # num_images > 1: every image, the first included
        body["images"] = [{"image_id": image.image_id, "filename": image.filename,
                           "url": image.url, "seed": image.seed} for image in result.images]
    return web.json_response(body)
