"""Engine errors as HTTP responses: the wire code, a message, and a fitting status.

Request errors (INVALID_REQUEST, UNKNOWN_LORA) are 422s in the original API's FastAPI
shape, naming the field: ``{"detail": [{"loc": ["body", field], "msg", "type"}], ...}``.
A body that cannot be read at all (malformed, nested too deeply, too large, of the wrong
content type) is a 4xx in the same shape (:func:`unreadable_body`), never a 5xx.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from types import MappingProxyType

from aiohttp import web

from schemas.errors import EngineError, ErrorCode, InvalidRequestError

__all__ = ["BODY_ERROR_STATUSES", "ERROR_STATUSES", "error_response", "retry_later",
           "unprocessable", "unreadable_body"]

logger = logging.getLogger(__name__)

ERROR_STATUSES: Mapping[ErrorCode, int] = MappingProxyType({
    ErrorCode.UNDECODABLE: 400,
    ErrorCode.INVALID_REQUEST: 422,
    ErrorCode.UNKNOWN_LORA: 422,
    ErrorCode.UPSTREAM_UNAVAILABLE: 503,
    ErrorCode.UPSTREAM_REJECTED: 502,
    ErrorCode.QUOTA_EXCEEDED: 429,
    ErrorCode.OUT_OF_MEMORY: 503,
    ErrorCode.TIMEOUT: 504,
    ErrorCode.INTERNAL: 500,
    ErrorCode.CANCELLED: 409,  # withdrawn by DELETE /requests/{id} or generation.control
    ErrorCode.EXPIRED: 504,  # its deadline passed before it started
})
"""The HTTP status :func:`error_response` answers each engine error code with."""
_FIELD_OF = {ErrorCode.UNKNOWN_LORA: "character_lora_id"}


def _detail(errors: list[dict[str, str]], kind: str, code: ErrorCode,
            where: str = "body") -> dict[str, object]:
    return {
        "detail": [
            {"loc": [where, *e["field"].split(".")] if e.get("field") else [where],
             "msg": e["message"], "type": kind}
            for e in errors
        ],
        "error_code": str(code),
    }


def unprocessable(errors: list[dict[str, str]], kind: str = "value_error",
                  code: ErrorCode = ErrorCode.INVALID_REQUEST, *,
                  where: str = "body") -> web.HTTPException:
    """A 422 to raise, naming each field in ``errors`` (``[{"field", "message"}]``) of the
    body, or of the ``query`` or ``path`` as ``where`` says (``loc`` as FastAPI's)."""
    return web.HTTPUnprocessableEntity(
        text=json.dumps(_detail(errors, kind, code, where)), content_type="application/json")


_BODY_ERRORS: dict[int, type[web.HTTPClientError]] = {
    400: web.HTTPBadRequest,
    408: web.HTTPRequestTimeout,
    415: web.HTTPUnsupportedMediaType,
    422: web.HTTPUnprocessableEntity,
}
BODY_ERROR_STATUSES = frozenset({*_BODY_ERRORS, 413})
"""The statuses :func:`unreadable_body` answers with, in the FastAPI shape."""


def unreadable_body(status: int, message: str, kind: str, *, loc: tuple[str, ...] = ("body",),
                    code: ErrorCode = ErrorCode.INVALID_REQUEST) -> web.HTTPException:
    """A 4xx to raise for a body that cannot be read (``status`` 400, 408, 413, 415, 422),
    naming the problem in ``message``; ``loc`` is where it is (``["body"]``, or
    ``["header", "content-type"]``)."""
    text = json.dumps({"detail": [{"loc": list(loc), "msg": message, "type": kind}],
                       "error_code": str(code)})
    if status == 413:
        return web.HTTPRequestEntityTooLarge(max_size=0, actual_size=0, text=text,
                                             content_type="application/json")
    return _BODY_ERRORS[status](text=text, content_type="application/json")


def retry_later(message: str, retry_after: int) -> web.HTTPException:
    """A 503 to raise when the engine is at a limit for now (``UPSTREAM_UNAVAILABLE``,
    retryable), telling the client to send the request again after ``retry_after`` s."""
    return web.HTTPServiceUnavailable(
        text=json.dumps({"error_code": str(ErrorCode.UPSTREAM_UNAVAILABLE), "retryable": True,
                         "message": f"{message}; retry after {retry_after} s"}),
        content_type="application/json", headers={"Retry-After": str(retry_after)})


def error_response(error: EngineError) -> web.Response:
    """The response for an error raised by the core."""
    if isinstance(error, InvalidRequestError) or error.code in _FIELD_OF:
        field = getattr(error, "field", None) or _FIELD_OF.get(error.code, "")
        errors = getattr(error, "errors", None) or [{"field": field, "message": error.message}]
        return web.json_response(_detail(errors, "value_error", error.code), status=422)
    if error.code is ErrorCode.INTERNAL:  # the caller is told less: the log says what
        logger.error("HTTP request failed: %s", error.message, exc_info=error)
    retry_after = getattr(error, "retry_after", None)
    headers = {"Retry-After": str(max(1, round(retry_after or 5)))} if error.retryable else None
    return web.json_response(
        {"error_code": str(error.code), "message": error.public_message,
         "retryable": error.retryable},
        status=ERROR_STATUSES.get(error.code, 500),
        headers=headers,
    )
