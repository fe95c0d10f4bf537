"""A RetryBudget tells its listener of each retry it grants, and of nothing else: the one
place ``engine_retries_total`` is counted from, whichever layer retries."""

from __future__ import annotations

import random

from core.backoff import Backoff
from core.retry_budget import RetriesSpent, RetryBudget
from schemas.errors import EngineError, InvalidRequestError, UpstreamUnavailableError


class _Spent(RetriesSpent, UpstreamUnavailableError):
    pass


def test_each_granted_retry_is_told_once() -> None:
    told: list[EngineError] = []
    budget = RetryBudget(Backoff(max_attempts=3, rng=random.Random(1)), on_retry=told.append)
    first, second, third = (UpstreamUnavailableError(f"down {n}") for n in range(3))
    assert budget.retry(first) is not None and budget.retry(second) is not None
    assert budget.retry(third) is None  # the budget is spent
    assert told == [first, second]


def test_refused_retries_are_not_told() -> None:
    told: list[EngineError] = []
    budget = RetryBudget(Backoff(max_attempts=5, max_delay=1.0, rng=random.Random(1)),
                         on_retry=told.append)
    far = UpstreamUnavailableError("busy", retry_after=60.0)
    for error in (InvalidRequestError("bad"), _Spent("spent"), far):
        assert budget.retry(error) is None
    assert told == [] and budget.retries_left == 4


def test_a_budget_without_a_listener_retries_as_before() -> None:
    budget = RetryBudget(Backoff(max_attempts=2, rng=random.Random(1)))
    assert budget.retry(UpstreamUnavailableError("down")) is not None
    assert budget.retries_left == 0
