"""POST /train-lora and GET /train-lora/{training_id}: the original API's LoRA training.

The multipart body (``character_id``, ``trigger_word``, 5–50 ``images``; optionally
``request_id``, ``conversation_id``, ``steps``, ``learning_rate``, ``resolution``) is
streamed into a private upload folder (:mod:`http_files.form`, :mod:`http_files.uploads`)
under its own limits (the app-wide body limit is for JSON). The training service checks
the images from those files and copies them into the training's folder; the upload folder
is removed when the request ends, whatever the answer. Then the training runs in the
background and the response says so, as the original API did. At most
MAX_CONCURRENT_UPLOADS uploads are received at once: one more is answered 503 with
``Retry-After`` before its body is read. A new training is taken only while fewer than
MAX_IN_FLIGHT_LORA are in progress here (:mod:`http_files.training_gate`): one more is
answered 503 with ``Retry-After`` before its first image is stored.
"""

from __future__ import annotations

import uuid
from typing import Any

from aiohttp import web

from core.training import TrainingInterrupted, training_id_for
from http_files.errors import error_response, retry_later, unprocessable
from http_files.form import read_training_form
from http_files.services import SERVICES
from http_files.training_gate import TrainingsFull
from http_files.training_time import submit_timed
from http_files.uploads import UPLOADS, UploadsFull
from schemas.errors import EngineError, InternalError, InvalidRequestError
from schemas.events import LoraTrainingRequested, utc_now_iso

__all__ = ["get_training", "train_lora"]


async def train_lora(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    training = services.training
    if training is None:
        return _unavailable("no image model is loaded: LoRA training is not available")
    uploads = request.app[UPLOADS]
    gate = uploads.trainings

    async def admit(fields: dict[str, str | int | float]) -> None:
        character_id, request_id = fields.get("character_id"), fields.get("request_id")
        known = isinstance(character_id, str) and isinstance(request_id, str)
        await gate.check(training, training_id_for(str(character_id), str(request_id))
                         if known else None)

    try:
        async with uploads.receive() as folder:
            form = await read_training_form(
                request, folder, uploads.limits, max_images=training.limits.max_images,
                max_image_bytes=training.limits.max_image_bytes, before_images=admit)
            body: dict[str, Any] = {**form.fields, "images": []}
            body.setdefault("request_id", str(uuid.uuid4()))
            event = services.codec.validate(LoraTrainingRequested, body)
            training_id = training_id_for(event.character_id, event.request_id)
            async with gate.starting(training, training_id):
                status = await submit_timed(services.metrics, training, event, form.images)
    except (UploadsFull, TrainingsFull) as exc:
        services.metrics.http_rejected.labels("lora").inc()
        raise retry_later(str(exc), exc.retry_after) from None
    except InvalidRequestError as exc:
        raise unprocessable(exc.errors or [{"field": exc.field or "", "message": exc.message}])
    except EngineError as exc:
        return error_response(exc)
    except TrainingInterrupted:
        return _unavailable("the engine is stopping; send the request again")
    except OSError as exc:  # the upload folder could not be made (the OS's words: logged)
        return error_response(InternalError(f"the upload could not be stored: {exc}"))
    # the original API's vocabulary: "training_started" for any accepted training (GET
    # tells queued from training), "completed" for a replay of a finished one
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
    """The training's snapshot (:meth:`TrainingStatus.to_json`): its state (``queued``,
    ``training``, ``completed``, ``failed``) under ``status``, the name ``POST /train-lora``
    answers under, and under ``state``; 404 when unknown."""
    services = request.app[SERVICES]
    if services.training is None:
        return _unavailable("no image model is loaded: LoRA training is not available")
    status = await services.training.status(request.match_info["training_id"])
    if status is None:
        raise web.HTTPNotFound(text="no such training")
    return web.json_response(status.to_json())


def _unavailable(message: str) -> web.Response:
    return web.json_response({"error_code": "INTERNAL", "message": message, "retryable": True},
                             status=503)
