"""GET /schemas/{fingerprint}: the writer schema of an Avro single-object fingerprint.

A reader meeting a fingerprint its own ``.avsc`` files do not have (a record written after
a schema change) fetches the writer schema here and resolves it against the schema it holds,
so that consumers need not redeploy before the engine adds a field. Every schema the engine
knows is served (the current ones and ``schemas/avro/history/``), by any instance; the
fingerprint is the 16 hex digits of the 8 header bytes after ``C3 01``, in their order.
"""

from __future__ import annotations

import re

from aiohttp import web

from http_files.services import SERVICES

__all__ = ["get_schema"]

_FINGERPRINT = re.compile(r"[0-9A-Fa-f]{16}")
# A fingerprint names one schema text for ever: caches may keep the answer.
_CACHE_CONTROL = "public, max-age=31536000, immutable"


async def get_schema(request: web.Request) -> web.Response:
    """200 with the schema as JSON; 400 when the path is not 16 hex digits; 404 when no
    schema of the engine has that fingerprint."""
    text = request.match_info["fingerprint"]
    if _FINGERPRINT.fullmatch(text) is None:
        return _error(400, "INVALID_REQUEST", "fingerprint: expected 16 hex digits (the 8 "
                      "bytes after C3 01 in an Avro single-object record)")
    schema = request.app[SERVICES].codec.writer_schema(bytes.fromhex(text))
    if schema is None:
        return _error(404, "NOT_FOUND", f"no writer schema with fingerprint {text.lower()}")
    return web.Response(text=schema, content_type="application/json",
                        headers={"Cache-Control": _CACHE_CONTROL})


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error_code": code, "message": message, "retryable": False},
                             status=status)
