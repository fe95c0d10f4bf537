"""OpenTelemetry spans for the ``otel`` extra (``opentelemetry-sdk`` and the OTLP/HTTP
exporter); imported only by :func:`core.telemetry.spans.build_spans` when an endpoint is
configured, so the engine runs without these packages.

The engine's own :class:`~core.telemetry.trace.TraceContext` stays the currency: a span's
parent is the context it is given (a remote one for the record's ``traceparent``), and the
span's ids come back as a context, which goes on the published records and HTTP calls.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

from core.telemetry.spans import Attributes, SpanKind
from core.telemetry.trace import TraceContext, current_trace

__all__ = ["OtelSpans"]

_KINDS = {"consumer": trace.SpanKind.CONSUMER, "internal": trace.SpanKind.INTERNAL,
          "producer": trace.SpanKind.PRODUCER}


class OtelSpans:
    """Spans recorded by a private ``TracerProvider`` (the global one is left alone) and
    handed to ``processor``."""

    def __init__(self, processor: SpanProcessor, service_name: str) -> None:
        self._provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        self._provider.add_span_processor(processor)
        self._tracer = self._provider.get_tracer("multimodal-engine")

    @classmethod
    def to_endpoint(cls, endpoint: str, service_name: str,
                    exporter: SpanExporter | None = None) -> OtelSpans:
        """Batched export over OTLP/HTTP to ``{endpoint}/v1/traces`` (the path the
        ``OTEL_EXPORTER_OTLP_ENDPOINT`` convention appends)."""
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces")
        return cls(BatchSpanProcessor(exporter), service_name)

    @contextmanager
    def span(self, name: str, parent: TraceContext | None, kind: SpanKind = "internal",
             attributes: Attributes | None = None) -> Iterator[TraceContext | None]:
        context = None
        if parent is not None:
            remote = SpanContext(
                int(parent.trace_id, 16), int(parent.span_id, 16), is_remote=True,
                trace_flags=TraceFlags(parent.flags),
                trace_state=TraceState.from_header([parent.state]) if parent.state else None)
            context = trace.set_span_in_context(NonRecordingSpan(remote))
        with self._tracer.start_as_current_span(
                name, context=context, kind=_KINDS[kind], attributes=dict(attributes or {})
        ) as span:
            ids = span.get_span_context()
            own = TraceContext(format(ids.trace_id, "032x"), format(ids.span_id, "016x"),
                               int(ids.trace_flags), parent.state if parent else None)
            token = current_trace.set(own)
            try:
                yield own
            finally:
                current_trace.reset(token)

    def shutdown(self) -> None:
        self._provider.shutdown()
