"""What a handler is: a validated event in, a completed event out.

Handlers never see records, offsets or retries; the consume loop owns those. A handler
raises an :class:`~schemas.errors.EngineError` for failures (``retryable`` decides whether
the loop retries it).
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, Protocol

from core.backoff import Backoff
from core.retry_budget import RetryBudget
from core.scheduling import Placement
from schemas.events import Event, EventKind, GenerationCompleted

__all__ = ["Handler", "HandlerContext", "ProgressReporter", "RememberedAnswer", "Route"]

class ProgressReporter(Protocol):
    """Publishes ``generation.progress``: ``step`` of ``total``, the training ``loss``,
    and for voice the ``stream_url`` its audio plays from."""

    def __call__(self, step: int, total: int, loss: float | None, *,
                 stream_url: str | None = None) -> Awaitable[None]: ...


async def _no_progress(step: int, total: int, loss: float | None, *,
                       stream_url: str | None = None) -> None:
    return None


@dataclass(frozen=True)
class HandlerContext:
    """What a handler may know of its delivery besides the event: the run (1 for the
    first), where to report progress, where the request stands in line (for the GPU
    queue), and the request's retry budget, shared with the consume loop's own retries:
    a handler whose work retries upstream calls hands it down (and reports each call)."""

    attempt: int = 1
    progress: ProgressReporter = _no_progress
    placement: Placement = field(default_factory=Placement)
    budget: RetryBudget = field(default_factory=lambda: RetryBudget(Backoff()))


class Handler(Protocol):
    async def __call__(self, event: Any, context: HandlerContext) -> GenerationCompleted: ...


class RememberedAnswer(Protocol):
    """The completed event a request was already answered with, as its handler would
    answer it again from the remembered results, found cheaply (no GPU, no upstream or
    LLM call, no download); ``None`` when nothing is remembered for it. Raises nothing
    but ``CancelledError``."""

    async def __call__(self, event: Any) -> GenerationCompleted | None: ...


@dataclass(frozen=True)
class Route:
    """One input topic: the event type found there, its kind and its handler, and where
    its requests' remembered answers are looked up (none: nothing is remembered)."""

    topic: str
    kind: EventKind
    model: type[Event]
    handler: Handler
    remembered: RememberedAnswer | None = None
