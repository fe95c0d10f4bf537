"""Turning request bodies into validated events, and field errors into 422 responses.

The 422 body keeps the original (FastAPI) service's shape:
``{"detail": [{"loc": ["body", field], "msg": ..., "type": ...}]}``.

A body that cannot be read is always a 4xx naming the problem, never a 5xx: a content type
that is not JSON is a 415 (no ``Content-Type`` at all is read as JSON, as FastAPI does);
more than :data:`JSON_BODY_LIMIT` bytes a 413 (refused by ``Content-Length`` before
reading, else as soon as the limit is passed); a body broken on the wire (bad chunking,
bad compression) a 400; invalid JSON, or JSON nested deeper than :data:`MAX_JSON_DEPTH`,
a 422; a body that sends nothing for ``stall_seconds`` a 408. The messages name the
problem in the body, never the engine's insides.

While they arrive, at most ``max_concurrent_json`` bodies are read at once (see
:class:`~http_files.uploads.UploadLimits`): one more is answered 503 with ``Retry-After``
at once, not queued, as ``/train-lora`` answers one upload too many. A queued request would
hold its connection and buffers while waiting behind senders that may never finish; the
503 frees them and tells a well-behaved client when to come back. A body that has already
arrived whole is read without a place.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import StreamReader, hdrs, web
from aiohttp.http_exceptions import HttpProcessingError

from http_files.errors import retry_later, unprocessable, unreadable_body
from http_files.services import SERVICES
from http_files.uploads import UPLOADS, UploadsFull, stall_guard
from schemas.codec import EventCodec
from schemas.errors import ErrorCode, InvalidRequestError
from schemas.events import Event

__all__ = ["ANONYMOUS_CONVERSATION", "JSON_BODY_LIMIT", "MAX_JSON_DEPTH", "read_event"]

T = TypeVar("T", bound=Event)

JSON_BODY_LIMIT = 1 * 2**20
"""Bytes of a JSON request body (the app's ``client_max_size``)."""
MAX_JSON_DEPTH = 64
"""Deepest nesting of objects and arrays a JSON body may have (the events need 3)."""
ANONYMOUS_CONVERSATION = "http"
"""The ``conversation_id`` of a request that names none (the original API's bodies), as its
answer and events carry it. It is no conversation to schedule by: each such request is
scheduled as one of its own (:mod:`http_files.scheduled`)."""


async def read_event(request: web.Request, codec: EventCodec, model: type[T]) -> T:
    """Reads a JSON body into ``model``, giving HTTP requests the identity events carry
    (a fresh ``request_id``, ``conversation_id`` :data:`ANONYMOUS_CONVERSATION`) when
    absent.

    Raises a 422 naming the field for any invalid or missing field, or for a body that is
    not a JSON object; other unreadable bodies, and a 503 when too many are arriving, as the
    module docstring says.
    """
    body = await _read_json(request)
    if not isinstance(body, dict):
        raise unprocessable([{"field": "", "message": "body must be a JSON object"}], "dict_type")
    body.setdefault("request_id", str(uuid.uuid4()))
    body.setdefault("conversation_id", ANONYMOUS_CONVERSATION)
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
        raw = await _receive(request)
    except UploadsFull as exc:
        request.app[SERVICES].metrics.http_rejected.labels(_kind(request)).inc()
        raise retry_later(str(exc), exc.retry_after) from None
    except (web.RequestPayloadError, HttpProcessingError) as exc:  # bad chunking or gzip
        raise unreadable_body(400, f"the body could not be read: {_reason(exc)}",
                              "body_malformed", code=ErrorCode.UNDECODABLE) from None
    except ConnectionError:  # the client went away mid-body (no one reads this)
        raise unreadable_body(400, "the body ended early", "body_incomplete",
                              code=ErrorCode.UNDECODABLE) from None
    try:
        body = json.loads(raw)
    except RecursionError:  # the C parser's own guard, at about 1000 levels
        raise _too_deep() from None
    except json.JSONDecodeError as exc:
        raise _not_json(f"{exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    except UnicodeDecodeError as exc:
        raise _not_json(f"it is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except ValueError:  # the one other: an integer past sys.get_int_max_str_digits()
        raise _not_json("a number has too many digits") from None
    if _deeper_than(body, MAX_JSON_DEPTH):
        raise _too_deep()
    return body


async def _receive(request: web.Request) -> bytearray:
    """The body's bytes, as they arrive: each wait for more bounded by ``stall_seconds``
    (a 408), and in one of ``max_concurrent_json`` places (:class:`UploadsFull` when none
    is free), so that bodies still arriving hold at most that many times JSON_BODY_LIMIT.
    A body already all here needs no place: reading it cannot wait, so senders that stall
    cannot keep out the usual small requests."""
    content = request.content
    if content.is_eof():
        return await _read_all(content, lambda: None)
    uploads = request.app[UPLOADS]
    with uploads.receive_json():
        async with stall_guard(uploads.limits.stall_seconds) as progress:
            return await _read_all(content, progress)


async def _read_all(content: StreamReader, progress: Callable[[], None]) -> bytearray:
    body = bytearray()
    while True:
        progress()
        chunk = await content.readany()
        if not chunk:
            return body
        body += chunk
        if len(body) > JSON_BODY_LIMIT:  # after decompression, if any
            raise _too_large("more")


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


def _kind(request: web.Request) -> str:
    """The request kind of a JSON endpoint (``/generate/image`` → ``image``), a metric
    label."""
    return request.path.rstrip("/").rpartition("/")[2]


def _not_json(problem: str) -> web.HTTPException:
    return unreadable_body(422, f"body is not valid JSON: {problem}", "json_invalid")


def _too_deep() -> web.HTTPException:
    return unreadable_body(
        422, f"body is nested too deeply (more than {MAX_JSON_DEPTH} levels of objects and "
        "arrays)", "json_too_deep")


def _too_large(size: str) -> web.HTTPException:
    return unreadable_body(
        413, f"body is too large: a JSON request may have at most {JSON_BODY_LIMIT} bytes, "
        f"this one has {size}", "body_too_large")
