"""Engine errors as HTTP responses: the wire code, a message, and a fitting status."""

from __future__ import annotations

from aiohttp import web

from schemas.errors import EngineError, ErrorCode

__all__ = ["error_response"]

_STATUS = {
    ErrorCode.UNDECODABLE: 400,
    ErrorCode.INVALID_REQUEST: 422,
    ErrorCode.UNKNOWN_LORA: 422,
    ErrorCode.UPSTREAM_UNAVAILABLE: 503,
    ErrorCode.UPSTREAM_REJECTED: 502,
    ErrorCode.QUOTA_EXCEEDED: 429,
    ErrorCode.OUT_OF_MEMORY: 503,
    ErrorCode.TIMEOUT: 504,
    ErrorCode.INTERNAL: 500,
}


def error_response(error: EngineError) -> web.Response:
    """A JSON error body ``{"error_code", "message", "retryable"}`` with its status."""
    status = _STATUS.get(error.code, 500)
    headers = {"Retry-After": "5"} if error.retryable else None
    return web.json_response(
        {"error_code": str(error.code), "message": error.message, "retryable": error.retryable},
        status=status,
        headers=headers,
    )
