"""How ElevenLabs failures become engine errors.

    ElevenLabsError (http_status, upstream_status, attempts)
     ├── ElevenLabsUnavailableError  UPSTREAM_UNAVAILABLE  408, 429, 5xx, connection errors
     ├── ElevenLabsRejectedError     UPSTREAM_REJECTED     400, 401/403 (not quota), 404, 422
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
at all; proxies in front of ElevenLabs answer HTML or plain text. A message reaches the
caller (failed events, HTTP answers), so it names the HTTP status (``ElevenLabs unavailable
(HTTP 502)``) and, where ElevenLabs sent a code it documents (``voice_not_found``, ``quota_exceeded``,
``output_format_not_allowed`` ...), that code and, for codes about the request or the
account, upstream's message when it is one short printable line naming no host, address or
URL. Everything else (HTML pages, messages about upstream's servers, unknown codes) is
logged, truncated, and never returned. 401 and 403 go by the code: ``quota_exceeded`` is
QUOTA_EXCEEDED, ``output_format_not_allowed`` (a format above the account's tier) names the
``output_format``, and only an authentication failure (an auth code, or a 401 without a
documented code) says to check ELEVENLABS_API_KEY. 408 is transient, like 429 and 5xx.
Neither messages nor the log carry the API key: it is scrubbed in case upstream echoed it.
"""

from __future__ import annotations

import email.utils
import json
import logging
import re
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

logger = logging.getLogger(__name__)

_MESSAGE_LIMIT = 300  # upstream's message, when longer, is not passed on
_LOG_LIMIT = 500  # characters of an error body the log keeps
_CODE_LIMIT = 64
_VALIDATION_ITEMS = 3
_TRANSIENT = frozenset({408, 429})  # and every 5xx

# detail.status / detail.code values ElevenLabs documents (its API reference and help
# centre, shared/reference/FACTS.md); ``validation_error`` is this module's name for the
# OpenAPI document's 422 (HTTPValidationError). A caller sees these codes; any other is
# only logged, like the rest of a body.
_AUTH_FAILURES = frozenset({"invalid_api_key", "needs_authorization", "missing_permissions"})
_PLAN_LIMITS = frozenset({"output_format_not_allowed"})  # a format above the account's tier
_SHOWN_MESSAGES = frozenset({  # their message speaks of the request or the account
    "validation_error", "voice_not_found", "model_not_found", "max_character_limit_exceeded",
    "quota_exceeded", "too_many_concurrent_requests", "concurrent_limit_exceeded",
    "system_busy", *_PLAN_LIMITS,
})
_DOCUMENTED = _SHOWN_MESSAGES | _AUTH_FAILURES

_UNSAFE = re.compile(
    r"[<>{}\[\]]"  # markup, serialized objects
    r"|://"  # URLs
    r"|\b\d{1,3}(?:\.\d{1,3}){3}\b"  # IPv4 addresses
    r"|[0-9a-f]{0,4}:[0-9a-f]{0,4}:[0-9a-f]{0,4}"  # IPv6 addresses (and clock times)
    r"|\b[\w.-]+:\d{2,5}\b"  # host:port
    r"|traceback|exception|errno",
    re.IGNORECASE,
)


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
    """``(upstream_status, message)`` from an error body of any of the three shapes;
    ``(None, None)`` for a body that is not JSON (an HTML page from a proxy, plain text).
    The message is upstream's, unchecked: :func:`_shown` decides whether a caller sees it."""
    try:
        payload: Any = json.loads(body)
    except ValueError:
        return None, None
    if not isinstance(payload, dict):
        return None, None
    detail = payload.get("detail", payload)
    if isinstance(detail, dict):
        status = detail.get("status") or detail.get("code")
        message = detail.get("message") or detail.get("error")
        return (str(status)[:_CODE_LIMIT] if status else None), (
            str(message) if message else None)
    if isinstance(detail, list):
        return "validation_error", _validation_message(detail)
    return None, None


def _validation_message(items: list[Any]) -> str | None:
    """``loc: msg`` of the first few items of a 422 that pass :func:`_safe` (never their
    ``input``, which may be anything), and how many items more there were."""
    parts = []
    for item in items:
        if isinstance(item, dict):
            loc = [str(p) for p in item.get("loc", []) if p != "body"]
            parts.append(f"{'.'.join(loc) or 'body'}: {item.get('msg', 'invalid')}")
    kept: list[str] = []
    for part in parts:  # room left for "; and N more"
        if (_safe(part) and len(kept) < _VALIDATION_ITEMS
                and len("; ".join([*kept, part])) <= _MESSAGE_LIMIT - len("; and 99 more")):
            kept.append(part)
    more = len(parts) - len(kept)
    return "; ".join(kept) + (f"; and {more} more" if more else "") if kept else None


def _safe(text: str) -> bool:
    """Whether ``text`` is short, one printable line and names nothing of anybody's
    insides (markup, a URL, an address, a host and port, a traceback)."""
    return len(text) <= _MESSAGE_LIMIT and text.isprintable() and not _UNSAFE.search(text)


def _shown(upstream: str | None, message: str | None, secret: str) -> str | None:
    """Upstream's message when a caller may read it: a documented code whose message
    speaks of the caller's request or account, short and safe; otherwise ``None``."""
    if upstream not in _SHOWN_MESSAGES or not message:
        return None
    if secret:
        message = message.replace(secret, "***")
    return message if _safe(message) else None


def error_for_response(
    status_code: int,
    body: bytes,
    headers: Mapping[str, str],
    *,
    attempts: int,
    secret: str,
    output_format: str | None = None,
) -> ElevenLabsError:
    """The error for a non-2xx answer (see the module docstring for the mapping).

    Its message names the HTTP status and, for a code ElevenLabs documents, that code and
    (when short and safe) upstream's message about the request; anything else in the body
    (an HTML page, a message about upstream's servers, an unknown code) goes to the log,
    truncated and with ``secret`` (the API key) removed, never into the message.
    ``output_format`` (the one requested) is named when the plan does not include it."""
    upstream, raw = _detail(body)
    shown = _shown(upstream, raw, secret)
    documented = upstream if upstream in _DOCUMENTED else None
    if body.strip() and shown is None:  # the log alone keeps what upstream said
        text = body.decode("utf-8", "replace")
        if secret:
            text = text.replace(secret, "***")
        logger.warning("ElevenLabs answered HTTP %d with a body kept from the caller: %r",
                       status_code, text[:_LOG_LIMIT])
    label = f"HTTP {status_code}" + (f" {documented}" if documented else "")
    said = f": {shown}" if shown else ""
    context: dict[str, Any] = {
        "http_status": status_code, "upstream_status": upstream, "attempts": attempts
    }
    if upstream == "quota_exceeded":
        return ElevenLabsQuotaError(f"ElevenLabs quota exceeded ({label}){said}", **context)
    if upstream in _PLAN_LIMITS:
        named = f"output_format {output_format}" if output_format else "the output_format"
        return ElevenLabsRejectedError(
            f"ElevenLabs does not offer {named} on this account's plan ({label}){said}; "
            "choose another output_format", **context)
    if upstream in _AUTH_FAILURES or (status_code == 401 and documented is None):
        return ElevenLabsRejectedError(
            f"ElevenLabs refused the API key ({label}); check ELEVENLABS_API_KEY", **context
        )
    if status_code in _TRANSIENT or status_code >= 500:
        return ElevenLabsUnavailableError(
            f"ElevenLabs unavailable ({label}){said}",
            retry_after=parse_retry_after(headers.get("retry-after")),
            **context,
        )
    return ElevenLabsRejectedError(f"ElevenLabs rejected the request ({label}){said}",
                                   **context)


BackoffPolicy = Backoff
"""The policy of the budgets the backend makes for calls that bring none (RETRY_* settings
through :func:`~core.voice.factory.build_voice_service`)."""
