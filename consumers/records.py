"""What a consumed record says of itself, read the same way everywhere: its content-type
header, its trace context, and the text fields of a value that may not have decoded."""

from __future__ import annotations

from collections.abc import Iterable

from core.telemetry.trace import TraceContext
from schemas.unicode import is_unicode_text

__all__ = ["content_type", "text_or_none", "trace_context"]

_ECHO_LIMIT = 1024

Headers = Iterable[tuple[str, bytes | None]] | None


def content_type(headers: Headers) -> str | None:
    """The ``content-type`` header (name case ignored) as text, or ``None``."""
    return _header(headers, "content-type")


def trace_context(headers: Headers) -> TraceContext | None:
    """The W3C trace context of the ``traceparent`` and ``tracestate`` headers (names case
    ignored, the first of each), or ``None`` when absent or malformed."""
    return TraceContext.parse(_header(headers, "traceparent"), _header(headers, "tracestate"))


def text_or_none(value: object) -> str | None:
    """``value`` when it is a string that can be echoed back, else ``None``: a field of a
    rejected record may be anything, and what is echoed must publish. So it must be
    non-empty, at most 1,024 characters (a huge id would make the answer too large for the
    broker) and encodable as UTF-8 (JSON escapes can carry lone surrogates, which neither
    Avro, JSON nor a header can)."""
    if not isinstance(value, str) or not value or len(value) > _ECHO_LIMIT \
            or not is_unicode_text(value):
        return None
    return value


def _header(headers: Headers, wanted: str) -> str | None:
    for name, value in headers or ():
        if name.lower() == wanted and value is not None:
            return value.decode("latin-1")
    return None
