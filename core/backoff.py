"""Capped exponential backoff with full jitter, shared by every retry in the engine."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

__all__ = ["Backoff"]


@dataclass(frozen=True)
class Backoff:
    """At most ``max_attempts`` tries of one request (RETRY_MAX_ATTEMPTS); before retry
    ``n`` (1-based) a wait drawn uniformly from ``[0, min(max_delay, base_delay *
    2**(n-1))]``, never shorter than an upstream's ``Retry-After`` (see :meth:`wait`)."""

    max_attempts: int = 6
    base_delay: float = 0.5
    max_delay: float = 30.0
    rng: random.Random = field(default_factory=random.Random, compare=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.base_delay < 0 or self.max_delay < 0:
            raise ValueError("base_delay and max_delay must be >= 0")

    def jittered(self, retry: int) -> float:
        return self.rng.uniform(0, min(self.max_delay, self.base_delay * 2 ** (retry - 1)))

    def wait(self, retry: int, retry_after: float | None = None) -> float | None:
        """Seconds to wait before retry number ``retry`` (1-based): the jittered backoff,
        or ``retry_after`` when upstream asks for longer. ``None`` when upstream asks for
        more than ``max_delay``: such a wait is not served here (a shorter one would only
        be refused again), the error goes up carrying its ``retry_after``."""
        if retry_after is not None and retry_after > self.max_delay:
            return None
        wait = self.jittered(retry)
        return wait if retry_after is None else max(wait, retry_after)
