"""What an operator sees of the engine besides its metrics: logs (text or JSON lines with
the request's ids), W3C trace context carried from requests to their events and upstream
calls, optional OpenTelemetry spans, and the observed shared HTTP client."""

from core.telemetry.http import ObservedClient, UpstreamNames
from core.telemetry.logs import LOG_FIELDS, JsonFormatter, configure_logging, log_context
from core.telemetry.spans import ContextSpans, Spans, build_spans
from core.telemetry.trace import TraceContext, current_trace

__all__ = [
    "LOG_FIELDS", "ContextSpans", "JsonFormatter", "ObservedClient", "Spans", "TraceContext",
    "UpstreamNames", "build_spans", "configure_logging", "current_trace", "log_context",
]
