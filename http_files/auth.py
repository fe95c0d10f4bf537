"""API keys: with ``API_KEYS`` set, every route but the probes (``/health/live``,
``/health/ready``) needs ``Authorization: Bearer <key>``, ``/health`` included. The operator
may open ``/metrics`` (``METRICS_REQUIRE_KEY=false``) and the files (``/outputs/{filename}``
and the live ``/streams/voice/{instance}/{stream_id}``: ``OUTPUTS_REQUIRE_KEY=false``), each
leaving the contract's rule for those routes: their URLs are then capability URLs (a random
uuid4), for players that cannot send headers.

A key is configured plain or as ``sha256:<hex>`` of it, so that the environment need not
hold the keys themselves. Only SHA-256 digests are kept: a presented key is hashed and
compared with every configured digest in constant time (``hmac.compare_digest``, all of
them, no early exit), so neither timing nor order says which key came close. Keys are
random bearer tokens, not passwords, which is why one fast hash suffices.

A refusal is a 401 with ``WWW-Authenticate: Bearer`` (RFC 6750) and a JSON body
(``error_code`` ``UNAUTHORIZED``); neither it nor the log ever repeats a presented key.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from core.settings import Settings

__all__ = ["PROBE_PATHS", "AccessPolicy", "access_policy", "require_api_key",
           "warn_if_open"]

logger = logging.getLogger(__name__)

PROBE_PATHS = frozenset({"/health/live", "/health/ready"})
"""Routes that never need a key: an orchestrator's probes carry none."""
_METRICS = "/metrics"
_OUTPUTS = frozenset({"/outputs/{filename}", "/streams/voice/{instance}/{stream_id}"})
_HASHED = "sha256:"
_CHALLENGE = 'Bearer realm="multimodal-engine"'


@dataclass(frozen=True)
class AccessPolicy:
    """Who may call what: ``digests`` are the SHA-256 digests of the keys (none: the app
    is open); ``/metrics`` and the files (``/outputs/{filename}``, voice streams) need a
    key too unless their flag opens them."""

    digests: tuple[bytes, ...] = ()
    metrics_require_key: bool = True
    outputs_require_key: bool = True

    def __repr__(self) -> str:  # the digests stay out of every repr
        return (f"AccessPolicy(keys={len(self.digests)}, metrics_require_key="
                f"{self.metrics_require_key}, outputs_require_key={self.outputs_require_key})")

    @property
    def enabled(self) -> bool:
        return bool(self.digests)

    def open_paths(self) -> frozenset[str]:
        """The routes (as aiohttp's canonical paths) that need no key."""
        metrics = frozenset() if self.metrics_require_key else frozenset({_METRICS})
        files = frozenset() if self.outputs_require_key else _OUTPUTS
        return PROBE_PATHS | metrics | files

    def accepts(self, key: str) -> bool:
        """Whether ``key`` is one of the configured keys, in constant time over them."""
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        matched = False
        for known in self.digests:  # every one, whatever matched before
            matched |= hmac.compare_digest(digest, known)
        return matched


def access_policy(settings: Settings) -> AccessPolicy:
    """The policy of ``API_KEYS`` (already checked by :class:`~core.settings.Settings`),
    ``METRICS_REQUIRE_KEY`` and ``OUTPUTS_REQUIRE_KEY``."""
    digests: list[bytes] = []
    if settings.api_keys is not None:
        for entry in settings.api_keys.get_secret_value().split(","):
            entry = entry.strip()
            if entry.startswith(_HASHED):
                digests.append(bytes.fromhex(entry.removeprefix(_HASHED)))
            else:
                digests.append(hashlib.sha256(entry.encode("utf-8")).digest())
    return AccessPolicy(tuple(dict.fromkeys(digests)), settings.metrics_require_key,
                        settings.outputs_require_key)


def require_api_key(policy: AccessPolicy) -> Middleware:
    """The middleware enforcing ``policy`` on every route not in its open paths (an
    unknown path too: without a key, nothing says which paths exist)."""
    open_paths = policy.open_paths()

    @web.middleware
    async def api_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else None
        if route in open_paths:
            return await handler(request)
        scheme, _, key = request.headers.get("Authorization", "").strip().partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            logger.debug("401 %s %s: no bearer key", request.method, route or "(no route)")
            return _unauthorized("an API key is required: send Authorization: Bearer <key>",
                                 _CHALLENGE)
        if not policy.accepts(key):
            logger.info("401 %s %s from %s: not a configured API key", request.method,
                        route or "(no route)", request.remote)
            return _unauthorized("the API key is not valid",
                                 f'{_CHALLENGE}, error="invalid_token"')
        return await handler(request)

    return api_key


def _unauthorized(message: str, challenge: str) -> web.Response:
    return web.json_response(
        {"error_code": "UNAUTHORIZED", "message": message, "retryable": False},
        status=401, headers={"WWW-Authenticate": challenge})


def warn_if_open(host: str, port: int, policy: AccessPolicy) -> bool:
    """Logs a loud warning when the app listens beyond loopback without keys; returns
    whether it did."""
    if policy.enabled or _loopback(host):
        return False
    logger.warning(
        "!!! HTTP API OPEN: listening on %s:%d with no API_KEYS: anyone who reaches this "
        "port can generate images and voice, train LoRAs (GPU-hours each), cancel any "
        "request and read /metrics. Set API_KEYS (README: 'API keys and probes'), or keep "
        "the port off the network. !!!", host or "0.0.0.0", port)
    return True


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name other than localhost, or "" (every interface)
        return False
