"""GET /metrics: the injected registry in the exposition format the scraper asks for
(OpenMetrics when its ``Accept`` names it, as Prometheus's does; else the text format),
gzipped when it accepts gzip."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.exposition import choose_encoder

from http_files.services import SERVICES

__all__ = ["metrics"]

_OPENMETRICS = "application/openmetrics-text"


async def metrics(request: web.Request) -> web.Response:
    registry = request.app[SERVICES].metrics.registry
    accept = request.headers.get("Accept", "")
    if _OPENMETRICS in accept:
        encoder, content_type = choose_encoder(accept)
        body = encoder(registry)
    else:
        body, content_type = generate_latest(registry), CONTENT_TYPE_LATEST
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    response.enable_compression()  # only when the request's Accept-Encoding allows it
    return response
