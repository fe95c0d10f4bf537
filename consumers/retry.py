"""Bounded retries of transient errors: capped exponential backoff with full jitter.

Only errors whose ``retryable`` is true are retried; an upstream's ``Retry-After`` is
honoured (never waiting less than it asks, never more than the cap). Waiting goes through
an injected ``sleep`` so tests run without real time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from core.backoff import Backoff
from schemas.errors import EngineError, InternalError

__all__ = ["RetryExhausted", "RetryPolicy", "call_with_retries"]

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy(Backoff):
    """The consume loop's retries of a whole request."""

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        wait = self.jittered(attempt)
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.max_delay))
        return wait


class RetryExhausted(Exception):
    """The last error of a call that was given up on, with the number of attempts made."""

    def __init__(self, error: EngineError, attempts: int) -> None:
        super().__init__(error.message)
        self.error = error
        self.attempts = attempts


async def call_with_retries(
    call: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    *,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    on_retry: Callable[[EngineError, int, float], None] | None = None,
) -> tuple[T, int]:
    """Runs ``call`` until it succeeds, returning its result and the attempts made.

    Raises :class:`RetryExhausted` carrying the final :class:`EngineError` (permanent
    errors at once, transient ones after ``policy.max_attempts``). Errors outside the
    hierarchy are translated to ``INTERNAL`` (not retried), keeping the cause.
    """
    attempt = 0
    while True:
        attempt += 1
        try:
            return await call(), attempt
        except EngineError as exc:
            error = exc
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug or an untranslated foreign error
            error = InternalError(f"{type(exc).__name__}: {exc}")
            error.__cause__ = exc
        if not error.retryable or attempt >= policy.max_attempts:
            raise RetryExhausted(error, attempt) from error
        wait = policy.delay(attempt, getattr(error, "retry_after", None))
        if on_retry is not None:
            on_retry(error, attempt, wait)
        await sleep(wait)
