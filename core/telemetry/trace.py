"""W3C Trace Context (``traceparent``, ``tracestate``): parsed from a request, carried onto
what the engine sends for it.

A request record's ``traceparent`` names the caller's trace and span; everything the
engine publishes or calls for that request carries the same trace id with a span id of
its own (the engine's span), so a tracing backend links them. A malformed header is
ignored, as the W3C recommendation says: the request simply has no trace context.

:data:`current_trace` holds the context of the work running now; the upstream HTTP client
reads it (handlers see events, not records, so it travels with the task instead).
"""

from __future__ import annotations

import re
import secrets
from contextvars import ContextVar
from dataclasses import dataclass, replace

__all__ = ["TraceContext", "current_trace", "new_span_id", "new_trace_id"]

# version 00: exactly this; a later version may append fields after a dash
_TRACEPARENT = re.compile(
    r"^(?P<version>[0-9a-f]{2})-(?P<trace>[0-9a-f]{32})-(?P<span>[0-9a-f]{16})"
    r"-(?P<flags>[0-9a-f]{2})(?P<rest>-.*)?$")
_MAX_TRACESTATE = 512  # the length every vendor must pass on; longer is dropped, not cut
_TRACESTATE = re.compile(r"^[\x20-\x7e]*$")


@dataclass(frozen=True)
class TraceContext:
    """One span of a trace: ``trace_id`` (32 hex), ``span_id`` (16 hex), the ``flags``
    byte (bit 0: sampled) and the vendors' opaque ``state`` (``tracestate``)."""

    trace_id: str
    span_id: str
    flags: int = 1
    state: str | None = None

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags:02x}"

    def child(self) -> TraceContext:
        """The same trace with a new span id: a span of this one."""
        return replace(self, span_id=new_span_id())

    def headers(self) -> list[tuple[str, str]]:
        """``traceparent`` and, when there is one, ``tracestate``."""
        out = [("traceparent", self.traceparent)]
        if self.state:
            out.append(("tracestate", self.state))
        return out

    @classmethod
    def parse(cls, traceparent: str | None, tracestate: str | None = None
              ) -> TraceContext | None:
        """The context a ``traceparent`` value names, or ``None`` when it is absent or
        malformed (wrong shape, version ``ff``, an all-zero id, extra fields on version
        00). A ``tracestate`` that is not printable ASCII or is too long is dropped."""
        if traceparent is None:
            return None
        match = _TRACEPARENT.match(traceparent.strip())
        if match is None:
            return None
        version, trace_id, span_id = match["version"], match["trace"], match["span"]
        if version == "ff" or (version == "00" and match["rest"]):
            return None
        if trace_id == "0" * 32 or span_id == "0" * 16:
            return None
        state = tracestate.strip() if tracestate else None
        if state is not None and (len(state) > _MAX_TRACESTATE or not _TRACESTATE.match(state)):
            state = None
        return cls(trace_id, span_id, int(match["flags"], 16), state or None)


def new_span_id() -> str:
    while True:
        value = secrets.token_hex(8)
        if value != "0" * 16:
            return value


def new_trace_id() -> str:
    while True:
        value = secrets.token_hex(16)
        if value != "0" * 32:
            return value


current_trace: ContextVar[TraceContext | None] = ContextVar("current_trace", default=None)
