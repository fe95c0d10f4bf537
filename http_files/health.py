"""GET /health: the engine's state; 200 when ok, 503 while starting or degraded.

The probes, for an orchestrator: GET /health/live (200 unless the process is wedged: the
GPU worker thread dead or stuck on one item; Kafka does not count, so a broker blip
restarts nothing) and GET /health/ready (200 once started, while Kafka is connected and
before a stop: it turns 503 when draining begins). Neither needs an API key.
"""

from __future__ import annotations

from aiohttp import web

from http_files.services import SERVICES

__all__ = ["health", "live", "ready"]


async def health(request: web.Request) -> web.Response:
    snapshot = request.app[SERVICES].health.snapshot()
    return web.json_response(snapshot, status=200 if snapshot["status"] == "ok" else 503)


async def live(request: web.Request) -> web.Response:
    report = request.app[SERVICES].health.liveness()
    return web.json_response(report, status=200 if report["status"] == "live" else 503,
                             headers={"Cache-Control": "no-store"})


async def ready(request: web.Request) -> web.Response:
    report = request.app[SERVICES].health.readiness()
    return web.json_response(report, status=200 if report["status"] == "ready" else 503,
                             headers={"Cache-Control": "no-store"})
