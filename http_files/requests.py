"""DELETE /requests/{request_id}: withdraw a pending request.

The request is cancelled here when this instance holds it (an HTTP request, or a Kafka one
it is working on), and the cancel is published on ``generation.control`` so that every
instance acts on it (the request may be held by another one, or arrive later). Without a
local match the conversation must be named (``?conversation_id=``), as every control
record names one.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from http_files.errors import unprocessable
from http_files.services import SERVICES
from schemas.unicode import is_unicode_text

__all__ = ["cancel_request"]

logger = logging.getLogger(__name__)

_BROADCAST_TIMEOUT = 3.0


async def cancel_request(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    request_id = request.match_info["request_id"]
    if not _usable_id(request_id):
        raise unprocessable([{"field": "request_id",
                              "message": "must be 1 to 200 characters of text, not blank"}],
                            where="path")
    named = request.query.get("conversation_id") or None
    if named is not None and not _usable_id(named):
        raise unprocessable([{"field": "conversation_id",
                              "message": "must be 1 to 200 characters of text, not blank"}],
                            where="query")
    held = services.scheduling.pending.find(request_id)
    conversations = {p.conversation_id for p in held if named in (None, p.conversation_id)}
    if named is not None:
        conversations.add(named)
    if not conversations:
        raise web.HTTPNotFound(
            text='{"error_code": "INVALID_REQUEST", "message": "no pending request with this '
                 'id here; name its conversation (?conversation_id=) to cancel it on every '
                 'instance"}', content_type="application/json")
    cancelled = 0
    for conversation in sorted(conversations):
        cancelled += len(services.scheduling.pending.cancel(conversation, request_id))
    broadcast = services.broadcast_cancel is not None
    if services.broadcast_cancel is not None:
        try:  # bounded: with the broker gone, publishing would retry for ever
            async with asyncio.timeout(_BROADCAST_TIMEOUT):
                for conversation in sorted(conversations):
                    await services.broadcast_cancel(conversation, request_id)
        except TimeoutError:
            logger.warning("request_id=%s cancel not broadcast within %.0fs", request_id,
                           _BROADCAST_TIMEOUT)
            broadcast = False
    logger.info("request_id=%s cancel by HTTP: %d cancelled here, broadcast=%s",
                request_id, cancelled, broadcast)
    return web.json_response(
        {"request_id": request_id, "status": "cancelled" if cancelled else "cancel_requested",
         "cancelled_here": cancelled, "broadcast": broadcast},
        status=200 if cancelled else 202)


def _usable_id(value: str) -> bool:
    """What a control event can carry: not blank, at most 200 characters, valid Unicode."""
    return bool(value.strip()) and len(value) <= 200 and is_unicode_text(value)
