"""The server the app runs on: how long a connection may take to send a request.

aiohttp has no timeout for reading a request header: a client that sends part of one and
stops would hold its connection for as long as it likes. Its keep-alive timeout covers
that case too: a connection that has not sent a whole request header ``idle_timeout``
seconds after it opened, or after its previous response, is closed (between requests
that is the usual keep-alive limit). A request being handled, or a response being sent,
is never cut by it.
"""

from __future__ import annotations

from aiohttp import web

__all__ = ["IDLE_TIMEOUT", "app_runner"]

IDLE_TIMEOUT = 75.0
"""Longer than the idle timeout a proxy in front keeps its connections to the engine for
(60 s: ``deploy/caddy/Caddyfile``'s, ingress-nginx's and an AWS ALB's defaults), so that a
proxy never sends a request on a connection the engine is closing; a proxy's own header
timeout (docs/deployment.md) is the shorter limit for clients."""


def app_runner(app: web.Application, *, idle_timeout: float = IDLE_TIMEOUT,
               shutdown_timeout: float = 2.0) -> web.AppRunner:
    """A runner for ``app`` (set it up, then add a site): no access log, no signal
    handlers (the caller owns shutdown), a client that goes away cancels its own request,
    connections limited by ``idle_timeout`` (see the module docstring), and
    ``shutdown_timeout`` seconds for requests in flight at cleanup. Raises ``ValueError``
    for an ``idle_timeout`` not above 0 (aiohttp would read 0 as no limit)."""
    if not idle_timeout > 0:
        raise ValueError(f"idle_timeout must be > 0 seconds, got {idle_timeout}")
    # handler_cancellation: a client that goes away cancels its own queued request
    return web.AppRunner(app, access_log=None, handle_signals=False,
                         handler_cancellation=True, shutdown_timeout=shutdown_timeout,
                         keepalive_timeout=idle_timeout)
