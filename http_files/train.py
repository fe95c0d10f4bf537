"""POST /train-lora and GET /train-lora/{training_id}: the original API's LoRA training.

The multipart body (``character_id``, ``trigger_word``, 5–50 ``images``; optionally
``request_id``, ``conversation_id``, ``steps``, ``learning_rate``, ``resolution``) is
streamed part by part with its own limits (the app-wide body limit is for JSON): an image
over LORA_MAX_IMAGE_BYTES or one image too many stops the upload with a 422 naming it.
Everything is checked in memory before anything is written; then the training starts in
the background and the response says so, as the original API did.
"""

from __future__ import annotations

import uuid
from typing import Any

from aiohttp import BodyPartReader, web

from core.training import TrainingInterrupted
from http_files.errors import error_response, unprocessable
from http_files.services import SERVICES
from schemas.errors import EngineError, InvalidRequestError
from schemas.events import LoraTrainingRequested, utc_now_iso

__all__ = ["get_training", "train_lora"]

_TEXT_LIMIT = 4096
_TEXT_FIELDS = {"character_id", "trigger_word", "request_id", "conversation_id"}
_NUMBER_FIELDS: dict[str, type[int | float]] = {
    "steps": int, "learning_rate": float, "resolution": int}
_CHUNK = 64 * 1024


async def train_lora(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    if services.training is None:
        return _unavailable("no image model is loaded: LoRA training is not available")
    body = await _read_form(request, services.training.limits.max_images,
                            services.training.limits.max_image_bytes)
    body.setdefault("request_id", str(uuid.uuid4()))
    try:
        event = services.codec.validate(LoraTrainingRequested, body)
        status = await services.training.submit(event)
    except InvalidRequestError as exc:
        raise unprocessable(exc.errors or [{"field": exc.field or "", "message": exc.message}])
    except EngineError as exc:
        return error_response(exc)
    except TrainingInterrupted:
        return _unavailable("the engine is stopping; send the request again")
    response: dict[str, Any] = {
        "training_id": status.training_id,
        "status": "completed" if status.state == "completed" else "training_started",
        "character_id": status.character_id,
        "trigger_word": status.trigger_word,
        "estimated_time_minutes": status.estimated_time_minutes or 0,
        "timestamp": utc_now_iso(),
        "request_id": status.request_id,
    }
    if status.lora_id is not None:
        response["lora_id"] = status.lora_id
    return web.json_response(response)


async def get_training(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    if services.training is None:
        return _unavailable("no image model is loaded: LoRA training is not available")
    status = await services.training.status(request.match_info["training_id"])
    if status is None:
        raise web.HTTPNotFound(text="no such training")
    return web.json_response(status.to_json())


async def _read_form(request: web.Request, max_images: int, max_bytes: int
                     ) -> dict[str, Any]:
    """The form as an event body; raises a 422 naming the field for anything wrong."""
    if not request.content_type.startswith("multipart/"):
        raise unprocessable([{"field": "", "message": "the body must be multipart/form-data "
                              "with character_id, trigger_word and images"}])
    body: dict[str, Any] = {"images": []}
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            raise unprocessable([{"field": "", "message": "nested multipart is not accepted"}])
        name = part.name or ""
        if name == "images":
            index = len(body["images"])
            if index >= max_images:
                raise unprocessable([{"field": "images", "message":
                                      f"at most {max_images} training images are allowed "
                                      f"(MAX_LORA_IMAGES), got more"}])
            data = await _read_part(part, max_bytes, f"images.{index}",
                                    f"more than LORA_MAX_IMAGE_BYTES={max_bytes} bytes")
            body["images"].append({"filename": part.filename or f"image-{index}",
                                   "data": data})
        else:
            raw = await _read_part(part, _TEXT_LIMIT, name or "",
                                   f"more than {_TEXT_LIMIT} bytes")
            if name in _TEXT_FIELDS or name in _NUMBER_FIELDS:
                body[name] = _text_value(name, raw)
    return body


async def _read_part(part: BodyPartReader, limit: int, field: str, too_large: str) -> bytes:
    data = bytearray()
    while chunk := await part.read_chunk(_CHUNK):
        data.extend(chunk)
        if len(data) > limit:
            raise unprocessable([{"field": field, "message": f"{field}: {too_large}"}])
    return bytes(data)


def _text_value(name: str, raw: bytes) -> str | int | float:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise unprocessable([{"field": name, "message": f"{name} is not UTF-8 text"}]) from None
    convert = _NUMBER_FIELDS.get(name)
    if convert is None:
        return text
    try:
        return convert(text.strip())
    except ValueError:
        raise unprocessable([{"field": name, "message": f"{name} must be a number, got "
                              f"{text[:40]!r}"}]) from None


def _unavailable(message: str) -> web.Response:
    return web.json_response({"error_code": "INTERNAL", "message": message, "retryable": True},
                             status=503)
