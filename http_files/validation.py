"""Turning request bodies into validated events, and field errors into 422 responses.

The 422 body keeps the original (FastAPI) service's shape:
``{"detail": [{"loc": ["body", field], "msg": ..., "type": ...}]}``.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, TypeVar

from aiohttp import web

from http_files.errors import unprocessable
from schemas.codec import EventCodec
from schemas.errors import InvalidRequestError
from schemas.events import Event

__all__ = ["read_event"]

T = TypeVar("T", bound=Event)


async def read_event(request: web.Request, codec: EventCodec, model: type[T]) -> T:
    """Reads a JSON body into ``model``, giving HTTP requests the identity events carry
    (a fresh ``request_id``, ``conversation_id`` "http") when absent.

    Raises a 422 naming the field for any invalid or missing field, or for a body that is
    not a JSON object.
    """
    try:
        body: Any = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise unprocessable([{"field": "", "message": "body is not valid JSON"}], "json_invalid")
    if not isinstance(body, dict):
        raise unprocessable([{"field": "", "message": "body must be a JSON object"}], "dict_type")
    body.setdefault("request_id", str(uuid.uuid4()))
    body.setdefault("conversation_id", "http")
    try:
        return codec.validate(model, body)
    except InvalidRequestError as exc:
        raise unprocessable(exc.errors or [{"field": exc.field or "", "message": exc.message}])
