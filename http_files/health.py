"""GET /health: the engine's state; 200 when ok, 503 while starting or degraded."""

from __future__ import annotations

from aiohttp import web

from http_files.services import SERVICES

__all__ = ["health"]


async def health(request: web.Request) -> web.Response:
    snapshot = request.app[SERVICES].health.snapshot()
    return web.json_response(snapshot, status=200 if snapshot["status"] == "ok" else 503)
