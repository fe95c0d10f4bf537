"""Turning request bodies into validated events, and field errors into 422 responses.

The 422 body keeps the original (FastAPI) service's shape:
``{"detail": [{"loc": ["body", field], "msg": ..., "type": ...}]}``.

A body that cannot be read is always a 4xx naming the problem, never a 5xx: a content type
that is not JSON is a 415 (no ``Content-Type`` at all is read as JSON, as FastAPI does);
more than :data:`JSON_BODY_LIMIT` bytes a 413 (refused by ``Content-Length`` before
reading, else as soon as the limit is passed); a body broken on the wire (bad chunking,
bad compression) a 400; invalid JSON, or JSON nested deeper than :data:`MAX_JSON_DEPTH`,
a 422.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, TypeVar

from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError

from http_files.errors import unprocessable, unreadable_body
from schemas.codec import EventCodec
from schemas.errors import ErrorCode, InvalidRequestError
from schemas.events import Event

__all__ = ["JSON_BODY_LIMIT", "MAX_JSON_DEPTH", "read_event"]

T = TypeVar("T", bound=Event)

JSON_BODY_LIMIT = 1 * 2**20
"""Bytes of a JSON request body (the app's ``client_max_size``)."""
MAX_JSON_DEPTH = 64
"""Deepest nesting of objects and arrays a JSON body may have (the events need 3)."""


async def read_event(request: web.Request, codec: EventCodec, model: type[T]) -> T:
    """Reads a JSON body into ``model``, giving HTTP requests the identity events carry
    (a fresh ``request_id``, ``conversation_id`` "http") when absent.

    Raises a 422 naming the field for any invalid or missing field, or for a body that is
    not a JSON object; other unreadable bodies as the module docstring says.
    """
    body = await _read_json(request)
    if not isinstance(body, dict):
        raise unprocessable([{"field": "", "message": "body must be a JSON object"}], "dict_type")
    body.setdefault("request_id", str(uuid.uuid4()))
    body.setdefault("conversation_id", "http")
    try:
        return codec.validate(model, body)
    except InvalidRequestError as exc:
        raise unprocessable(exc.errors or [{"field": exc.field or "", "message": exc.message}])


async def _read_json(request: web.Request) -> Any:
    _check_content_type(request)
    declared = request.content_length
    if declared is not None and declared > JSON_BODY_LIMIT:
        raise _too_large(f"{declared}")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _too_large("more") from None
    except (web.RequestPayloadError, HttpProcessingError) as exc:  # bad chunking or gzip
        raise unreadable_body(400, f"the body could not be read: {_reason(exc)}",
                              "body_malformed", code=ErrorCode.UNDECODABLE) from None
    except ConnectionError as exc:  # the client went away mid-body (no one reads this)
        raise unreadable_body(400, f"the body ended early: {exc}", "body_incomplete",
                              code=ErrorCode.UNDECODABLE) from None
    try:
        body = json.loads(raw)
    except RecursionError:  # the C parser's own guard, at about 1000 levels
        raise _too_deep() from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, a 5000-digit number
        raise unreadable_body(422, f"body is not valid JSON: {exc}", "json_invalid") from None
    if _deeper_than(body, MAX_JSON_DEPTH):
        raise _too_deep()
    return body


def _check_content_type(request: web.Request) -> None:
    if hdrs.CONTENT_TYPE not in request.headers:
        return
    kind = request.content_type.lower()
    main, _, sub = kind.partition("/")
    if main == "application" and (sub == "json" or sub.endswith("+json")):
        return
    raise unreadable_body(
        415, f"the body must be JSON (Content-Type: application/json), got {kind!r}",
        "content_type", loc=("header", "content-type"))


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether ``value`` nests objects/arrays more than ``limit`` deep (no recursion)."""
    if not isinstance(value, (dict, list)):
        return False
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children
                     if isinstance(child, (dict, list)))
    return False


def _reason(exc: Exception) -> str:
    """aiohttp's words for a broken body ("Can not decode content-encoding: gzip")."""
    cause = exc.__cause__ if isinstance(exc, web.RequestPayloadError) else exc
    message = cause.message if isinstance(cause, HttpProcessingError) else None
    return str(message or cause or type(exc).__name__)[:200]


def _too_deep() -> web.HTTPException:
    return unreadable_body(
        422, f"body is nested too deeply (more than {MAX_JSON_DEPTH} levels of objects and "
        "arrays)", "json_too_deep")


def _too_large(size: str) -> web.HTTPException:
    return unreadable_body(
        413, f"body is too large: a JSON request may have at most {JSON_BODY_LIMIT} bytes, "
        f"this one has {size}", "body_too_large")
