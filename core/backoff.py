"""Capped exponential backoff with full jitter, shared by every retry in the engine."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

__all__ = ["Backoff"]


@dataclass(frozen=True)
class Backoff:
    """At most ``max_attempts`` tries; after try ``n`` (1-based) a wait drawn uniformly
    from ``[0, min(max_delay, base_delay * 2**(n-1))]``. Subclasses decide how an
    upstream's ``Retry-After`` combines with it."""

    max_attempts: int = 4
    base_delay: float = 0.5
    max_delay: float = 30.0
    rng: random.Random = field(default_factory=random.Random, compare=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.base_delay < 0 or self.max_delay < 0:
            raise ValueError("base_delay and max_delay must be >= 0")

    def jittered(self, attempt: int) -> float:
        return self.rng.uniform(0, min(self.max_delay, self.base_delay * 2 ** (attempt - 1)))
