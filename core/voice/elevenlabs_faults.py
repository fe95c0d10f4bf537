"""How ElevenLabs failures become engine errors.

    ElevenLabsError (http_status, upstream_status, attempts)
     ├── ElevenLabsUnavailableError  UPSTREAM_UNAVAILABLE  429, 5xx, connection errors (retried)
     ├── ElevenLabsRejectedError     UPSTREAM_REJECTED     400, 401 (not quota), 404, 422 ...
     ├── ElevenLabsQuotaError        QUOTA_EXCEEDED        detail.status "quota_exceeded" (401)
     └── ElevenLabsTimeoutError      TIMEOUT               no answer within the read timeout

Each is also the matching :mod:`schemas.errors` class, so callers that know only the
hierarchy (the consume loop, the HTTP layer) see the right code and ``retryable``.
``attempts`` says how many upstream attempts the request had made when it failed (its
:class:`~core.retry_budget.RetryBudget`'s count; 1 for a lone call);
``upstream_status`` is ElevenLabs' machine name (``quota_exceeded``,
``too_many_concurrent_requests``, ``system_busy``, ``invalid_api_key`` ...), when it sent one.

Error bodies come in three shapes: ``{"detail": {"status", "message"}}`` (most errors),
``{"detail": [{"loc", "msg", "type"}]}`` (422 validation) and, for some 500s, no ``detail``
at all. Messages never carry the API key: a 401 names only upstream's status, and every
message is scrubbed of the key in case upstream echoed it.
"""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Mapping
from typing import Any

from core.backoff import Backoff
from schemas.errors import (
    EngineError,
    GenerationTimeoutError,
    QuotaExceededError,
    UpstreamRejectedError,
    UpstreamUnavailableError,
)

__all__ = [
    "BackoffPolicy",
    "ElevenLabsError",
    "ElevenLabsQuotaError",
    "ElevenLabsRejectedError",
    "ElevenLabsTimeoutError",
    "ElevenLabsUnavailableError",
    "error_for_response",
    "parse_retry_after",
]

_MESSAGE_LIMIT = 300


class ElevenLabsError(EngineError):
    """A failed ElevenLabs call, with its context (see the module docstring)."""

    def __init__(
        self,
        message: str,
        *,
        http_status: int | None = None,
        upstream_status: str | None = None,
        attempts: int = 1,
    ) -> None:
        EngineError.__init__(self, message)
        self.http_status = http_status
        self.upstream_status = upstream_status
        self.attempts = attempts


class ElevenLabsUnavailableError(ElevenLabsError, UpstreamUnavailableError):
    """Transient: worth trying again, after ``retry_after`` seconds when upstream said."""

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        http_status: int | None = None,
        upstream_status: str | None = None,
        attempts: int = 1,
    ) -> None:
        ElevenLabsError.__init__(
            self, message, http_status=http_status, upstream_status=upstream_status,
            attempts=attempts,
        )
        self.retry_after = retry_after


class ElevenLabsRejectedError(ElevenLabsError, UpstreamRejectedError):
    """Permanent: the same request will be refused again."""


class ElevenLabsQuotaError(ElevenLabsError, QuotaExceededError):
    """The account's character quota is spent."""


class ElevenLabsTimeoutError(ElevenLabsError, GenerationTimeoutError):
    """ElevenLabs accepted the request but sent no (complete) answer in time."""


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date), or
    ``None`` when absent or unreadable. Never negative."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - (time.time() if now is None else now))


def _detail(body: bytes) -> tuple[str | None, str | None]:
    """``(upstream_status, message)`` from an error body of any of the three shapes."""
    try:
        payload: Any = json.loads(body)
    except ValueError:
        text = body.decode("utf-8", "replace").strip()
        return None, text[:_MESSAGE_LIMIT] or None
    if not isinstance(payload, dict):
        return None, None
    detail = payload.get("detail", payload)
    if isinstance(detail, dict):
        status = detail.get("status") or detail.get("code")
        message = detail.get("message") or detail.get("error")
        return (str(status) if status else None), (str(message) if message else None)
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                loc = [str(p) for p in item.get("loc", []) if p != "body"]
                parts.append(f"{'.'.join(loc) or 'body'}: {item.get('msg', 'invalid')}")
        return "validation_error", "; ".join(parts) or None
    return None, str(detail)[:_MESSAGE_LIMIT]


def error_for_response(
    status_code: int,
    body: bytes,
    headers: Mapping[str, str],
    *,
    attempts: int,
    secret: str,
) -> ElevenLabsError:
    """The error for a non-2xx answer (see the module docstring for the mapping);
    ``secret`` (the API key) is removed from any message."""
    upstream, message = _detail(body)
    if message and secret:
        message = message.replace(secret, "***")
    message = (message or "no message")[:_MESSAGE_LIMIT]
    label = f"HTTP {status_code}" + (f" {upstream}" if upstream else "")
    context: dict[str, Any] = {
        "http_status": status_code, "upstream_status": upstream, "attempts": attempts
    }
    if upstream == "quota_exceeded":
        return ElevenLabsQuotaError(f"ElevenLabs quota exceeded: {message}", **context)
    if status_code in (401, 403):
        return ElevenLabsRejectedError(
            f"ElevenLabs refused the API key ({label}); check ELEVENLABS_API_KEY", **context
        )
    if status_code == 429 or status_code >= 500:
        return ElevenLabsUnavailableError(
            f"ElevenLabs unavailable ({label}): {message}",
            retry_after=parse_retry_after(headers.get("retry-after")),
            **context,
        )
    return ElevenLabsRejectedError(f"ElevenLabs rejected the request ({label}): {message}",
                                   **context)


BackoffPolicy = Backoff
"""The policy of the budgets the backend makes for calls that bring none (RETRY_* settings
through :func:`~core.voice.factory.build_voice_service`)."""
