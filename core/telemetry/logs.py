"""Logging for the entry point: text lines (the default) or one JSON object per line.

``LOG_FORMAT=json`` writes ``time``, ``level``, ``logger``, ``message`` and, where known,
the fields of :data:`LOG_FIELDS` (``request_id``, ``conversation_id``, ``kind``, ``topic``,
``partition``, ``offset``, ``error_code``) and the trace's ``trace_id``/``span_id``. A field
comes from the logging call's ``extra=`` or, failing that, from :func:`log_context`, which
the code handling a record (or a request) enters once; so every line of that work carries
them without repeating them.

Secrets given to :func:`configure_logging` are replaced by ``**********`` in every line,
whatever the format (keys are ``SecretStr`` and never logged; this is the second fence).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Literal, TextIO

from core.telemetry.trace import current_trace

__all__ = ["LOG_FIELDS", "JsonFormatter", "configure_logging", "log_context"]

LOG_FIELDS = ("request_id", "conversation_id", "kind", "topic", "partition", "offset",
              "error_code")
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_MASK = "**********"

_context: ContextVar[Mapping[str, object]] = ContextVar(
    "log_context", default=MappingProxyType({}))


@contextmanager
def log_context(**fields: object) -> Iterator[None]:
    """Within the block (and the tasks it starts), log records carry ``fields`` (those of
    :data:`LOG_FIELDS`; ``None`` values are left out). Nested blocks add to the outer."""
    unknown = set(fields) - set(LOG_FIELDS)
    if unknown:
        raise ValueError(f"unknown log fields {sorted(unknown)}; known: {LOG_FIELDS}")
    merged = {**_context.get(), **{k: v for k, v in fields.items() if v is not None}}
    token = _context.set(MappingProxyType(merged))
    try:
        yield
    finally:
        _context.reset(token)


class _ContextFilter(logging.Filter):
    """Stamps the caller's context onto the record (in the caller's task and thread)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in _context.get().items():
            if getattr(record, name, None) is None:
                setattr(record, name, value)
        trace = current_trace.get()
        if trace is not None and getattr(record, "trace_id", None) is None:
            record.trace_id = trace.trace_id
            record.span_id = trace.span_id
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record; nothing but the documented fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in (*LOG_FIELDS, "trace_id", "span_id"):
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value if isinstance(value, (int, float, bool)) else str(value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class _Redacting(logging.Formatter):
    """Wraps a formatter; masks the secrets in what it writes."""

    def __init__(self, inner: logging.Formatter, secrets: Sequence[str]) -> None:
        super().__init__()
        self._inner = inner
        # JSON escapes some characters: mask the escaped form too
        self._secrets = sorted({form for s in secrets if s
                                for form in (s, json.dumps(s)[1:-1])}, key=len, reverse=True)

    def format(self, record: logging.LogRecord) -> str:
        text = self._inner.format(record)
        for secret in self._secrets:
            text = text.replace(secret, _MASK)
        return text


def configure_logging(level: str, log_format: Literal["text", "json"], *,
                      secrets: Sequence[str] = (), stream: TextIO | None = None) -> None:
    """Configures the root logger once, at the entry point: one handler on ``stream``
    (stderr by default) in ``log_format``. In JSON mode Python's warnings are logged too,
    so that every line is JSON. Raises ``ValueError`` for another format."""
    if log_format not in ("text", "json"):
        raise ValueError(f"LOG_FORMAT must be text or json, got {log_format!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    inner = JsonFormatter() if log_format == "json" else logging.Formatter(_TEXT_FORMAT)
    handler.setFormatter(_Redacting(inner, secrets))
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(log_format == "json")
