"""One retry budget per request, shared by every layer that retries it.

A request may be tried again at two levels: the ElevenLabs backend repeats one HTTP
request (cheap: nothing else is redone), and the consume loop runs the whole handler again
(for what no lower layer retries, such as a timeout). Layers counting on their own would
multiply (4 runs × 3 requests = 12 calls against a failing upstream); one
:class:`RetryBudget`, made per request and handed down, bounds them together:

- **Retries:** at most ``policy.max_attempts - 1`` in all, whichever layer asks
  (:meth:`RetryBudget.retry`). A request of one upstream call thus makes at most
  ``max_attempts`` calls; a text spoken in n parts makes its n first calls plus at most
  ``max_attempts - 1`` retries.
- **Waits:** :meth:`core.backoff.Backoff.wait`: capped exponential backoff with jitter,
  never shorter than an upstream's ``Retry-After``; a ``Retry-After`` beyond
  ``policy.max_delay`` ends the retries at once (the error carries it up).
- **Attempts** (the failed event's ``attempts``): what was really tried. Upstream calls
  where a layer reports them (:meth:`RetryBudget.attempt`); otherwise each run of the
  request counts one (:meth:`RetryBudget.begin_run`), or the attempts its error says it
  cost (:class:`RetriesSpent`).
- **Listener:** ``on_retry(error)``, when given, is told of each retry the budget grants,
  whichever layer asked for it: the one place to count retries (``engine_retries_total``)
  without missing a layer's or counting one twice.

A budget lives on the event loop of its request; it is not thread-safe.
"""

from __future__ import annotations

from collections.abc import Callable

from core.backoff import Backoff
from schemas.errors import EngineError

__all__ = ["RetriesSpent", "RetryBudget", "RetryListener"]

RetryListener = Callable[[EngineError], None]
"""Told of each retry a budget grants, with the error retried, before the wait."""


class RetriesSpent:
    """Mixin for an :class:`~schemas.errors.EngineError` whose raiser already made every
    attempt worth making now, ``attempts`` of them (the GPU worker's out of memory after
    its own retry): no layer retries it, though its ``retryable`` still tells operators
    that the same request may succeed later."""

    attempts: int = 1


class RetryBudget:
    """The retries and attempts of one request under ``policy``; ``on_retry`` is told of
    each retry granted (see the module docstring)."""

    def __init__(self, policy: Backoff, on_retry: RetryListener | None = None) -> None:
        self._policy = policy
        self._on_retry = on_retry
        self._attempts = 0
        self._retries = 0
        self._run_attempts: int | None = None  # attempts reported in the current run

    def __repr__(self) -> str:
        return (f"RetryBudget(attempts={self.attempts}, retries={self._retries} of "
                f"{self._policy.max_attempts - 1})")

    @property
    def max_attempts(self) -> int:
        """Attempts a request of one upstream call may make (RETRY_MAX_ATTEMPTS)."""
        return self._policy.max_attempts

    @property
    def attempts(self) -> int:
        """Attempts made so far; a run in progress that reported none counts one."""
        return self._attempts + (1 if self._run_attempts == 0 else 0)

    @property
    def retries_left(self) -> int:
        return self._policy.max_attempts - 1 - self._retries

    def begin_run(self) -> None:
        """A layer starts (another) run of the whole request: the previous run, if it
        reported no attempt of its own, counts as one."""
        self._end_run()
        self._run_attempts = 0

    def attempt(self, count: int = 1) -> int:
        """Report ``count`` attempts (upstream calls) made or about to be made; returns
        the attempts made so far."""
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        self._attempts += count
        if self._run_attempts is not None:
            self._run_attempts += count
        return self._attempts

    def settle(self, error: EngineError | None) -> None:
        """The current run ended (with ``error``, or ``None`` on success): a run that
        reported no attempt counts what ``error`` says it cost (:class:`RetriesSpent`),
        else one."""
        if self._run_attempts == 0 and isinstance(error, RetriesSpent):
            self.attempt(max(1, error.attempts))
        self._end_run()

    def retry(self, error: EngineError) -> float | None:
        """Seconds to wait before trying again after ``error``, taking one retry from the
        budget; ``None`` when it must not be tried again now: a permanent error, one
        whose retries are spent (:class:`RetriesSpent`), an empty budget, or an
        upstream asking to wait longer than ``policy.max_delay``. A granted retry is told
        to the listener (``on_retry``)."""
        if not error.retryable or isinstance(error, RetriesSpent) or self.retries_left < 1:
            return None
        wait = self._policy.wait(self._retries + 1, getattr(error, "retry_after", None))
        if wait is not None:
            self._retries += 1
            if self._on_retry is not None:
                self._on_retry(error)
        return wait

    def _end_run(self) -> None:
        if self._run_attempts == 0:
            self._attempts += 1
        self._run_attempts = None
