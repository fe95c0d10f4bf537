"""Bounded retries of a whole request, drawing on its one :class:`RetryBudget`.

Only errors whose ``retryable`` is true are retried, and only while the request's budget
lasts: the layers below (the ElevenLabs backend) spend the same budget on their own
retries, so the request's upstream attempts stay within RETRY_MAX_ATTEMPTS however they
are split. Waits honour an upstream's ``Retry-After`` and go through an injected
``sleep`` so tests run without real time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from core.backoff import Backoff
from core.retry_budget import RetryBudget
from schemas.errors import EngineError, InternalError

__all__ = ["RetryExhausted", "RetryPolicy", "call_with_retries"]

T = TypeVar("T")

RetryPolicy = Backoff
"""The policy of every request's budget (RETRY_MAX_ATTEMPTS, RETRY_BASE_DELAY,
RETRY_MAX_DELAY)."""


class RetryExhausted(Exception):
    """The last error of a call that was given up on, with the request's attempts."""

    def __init__(self, error: EngineError, attempts: int) -> None:
        super().__init__(error.message)
        self.error = error
        self.attempts = attempts


async def call_with_retries(
    call: Callable[[], Awaitable[T]],
    budget: RetryBudget,
    *,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    on_retry: Callable[[EngineError, int, float], None] | None = None,
) -> tuple[T, int]:
    """Runs ``call`` until it succeeds, returning its result and the request's attempts
    (``budget.attempts``: upstream calls where ``call`` reports them, else runs).

    Raises :class:`RetryExhausted` carrying the final :class:`EngineError` (permanent
    errors at once, transient ones when ``budget`` grants no more retries). Errors
    outside the hierarchy are translated to ``INTERNAL`` (not retried), keeping the cause.
    ``on_retry(error, run, wait)`` is told of each retry before its wait.
    """
    run = 0
    while True:
        run += 1
        budget.begin_run()
        try:
            result = await call()
        except EngineError as exc:
            error = exc
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug or an untranslated foreign error
            error = InternalError(f"{type(exc).__name__}: {exc}")
            error.__cause__ = exc
        else:
            budget.settle(None)
            return result, budget.attempts
        budget.settle(error)
        wait = budget.retry(error)
        if wait is None:
            raise RetryExhausted(error, budget.attempts) from error
        if on_retry is not None:
            on_retry(error, run, wait)
        await sleep(wait)
