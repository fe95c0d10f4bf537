"""The engine's spans for one request: consume → work → publish.

:class:`ContextSpans` (always there) only carries the trace: each span is the parent's
trace with a new span id, and a request without a ``traceparent`` has no trace at all, so
nothing changes for callers that send none. With the ``otel`` extra installed and
``OTEL_EXPORTER_OTLP_ENDPOINT`` set, :func:`build_spans` returns OpenTelemetry spans that
are exported (:mod:`core.telemetry.otel`) and start a new trace when a request has none.

Inside a span, :data:`~core.telemetry.trace.current_trace` is that span, so log lines and
the upstream HTTP calls made in it carry it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import Literal, Protocol

from core.telemetry.trace import TraceContext, current_trace

__all__ = ["ContextSpans", "SpanKind", "Spans", "build_spans"]

logger = logging.getLogger(__name__)

SpanKind = Literal["consumer", "internal", "producer"]
Attributes = Mapping[str, str | int]


class Spans(Protocol):
    def span(self, name: str, parent: TraceContext | None, kind: SpanKind = "internal",
             attributes: Attributes | None = None
             ) -> AbstractContextManager[TraceContext | None]:
        """A span named ``name``, child of ``parent``; yields its context (``None``: not
        traced) and makes it :data:`current_trace` within the block."""
        ...

    def shutdown(self) -> None:
        """Sends what is pending (bounded by the exporter's timeout)."""
        ...


class ContextSpans:
    """Trace context only: no export, no new traces."""

    @contextmanager
    def span(self, name: str, parent: TraceContext | None, kind: SpanKind = "internal",
             attributes: Attributes | None = None) -> Iterator[TraceContext | None]:
        context = parent.child() if parent is not None else None
        token = current_trace.set(context)
        try:
            yield context
        finally:
            current_trace.reset(token)

    def shutdown(self) -> None:
        return None


def build_spans(endpoint: str | None, service_name: str) -> Spans:
    """OpenTelemetry spans exported to ``endpoint`` (OTLP over HTTP) when it is set and the
    ``otel`` extra is installed; otherwise :class:`ContextSpans` (a warning says why when
    an endpoint was set in vain)."""
    if not endpoint:
        return ContextSpans()
    try:
        from core.telemetry.otel import OtelSpans
    except ImportError:
        logger.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but the otel extra is not "
                       "installed (pip install 'multimodal-engine[otel]'): spans are not "
                       "exported; trace context is still carried")
        return ContextSpans()
    logger.info("exporting spans to %s (OTLP/HTTP)", endpoint)
    return OtelSpans.to_endpoint(endpoint, service_name)
