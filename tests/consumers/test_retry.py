"""The consume loop's retries and the request's one retry budget: bounded attempts
whichever layer retries, backoff honouring Retry-After, attempts counted as upstream calls
(or runs, where nothing finer is reported)."""

import random

import pytest

from consumers.retry import RetryExhausted, RetryPolicy, call_with_retries
from core.retry_budget import RetriesSpent, RetryBudget
from schemas.errors import (
    GenerationTimeoutError,
    InvalidRequestError,
    OutOfMemoryError,
    UpstreamUnavailableError,
)


class FakeSleep:
    """Records the waits instead of sleeping."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def budget(**kw: float) -> RetryBudget:
    return RetryBudget(RetryPolicy(rng=random.Random(7), **kw))  # type: ignore[arg-type]


async def test_transient_errors_are_retried_then_succeed() -> None:
    sleep = FakeSleep()
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise UpstreamUnavailableError("503 from upstream")
        return "ok"

    result, attempts = await call_with_retries(flaky, budget(max_attempts=4), sleep=sleep)
    assert (result, attempts, calls) == ("ok", 3, 3)
    assert len(sleep.waits) == 2


async def test_backoff_is_capped_and_exhaustion_reports_attempts() -> None:
    sleep = FakeSleep()

    async def down() -> None:
        raise UpstreamUnavailableError("connection refused")

    with pytest.raises(RetryExhausted) as info:
        await call_with_retries(
            down, budget(max_attempts=6, base_delay=1.0, max_delay=3.0), sleep=sleep
        )
    assert info.value.attempts == 6
    assert info.value.error.retryable
    assert len(sleep.waits) == 5
    assert all(0 <= w <= 3.0 for w in sleep.waits)
    for retry, wait in enumerate(sleep.waits, start=1):
        assert wait <= min(3.0, 1.0 * 2 ** (retry - 1))


async def test_the_default_budget_is_six_attempts() -> None:
    async def down() -> None:
        raise UpstreamUnavailableError("500")

    with pytest.raises(RetryExhausted) as info:
        await call_with_retries(down, RetryBudget(RetryPolicy()), sleep=FakeSleep())
    assert info.value.attempts == 6


async def test_retry_after_is_honoured_in_full() -> None:
    sleep = FakeSleep()

    async def busy() -> None:
        raise UpstreamUnavailableError("429 system_busy", retry_after=2.5)

    with pytest.raises(RetryExhausted):
        await call_with_retries(busy, budget(max_attempts=3, base_delay=0.01), sleep=sleep)
    assert len(sleep.waits) == 2 and all(w >= 2.5 for w in sleep.waits)


async def test_a_retry_after_beyond_the_cap_fails_at_once_carrying_it() -> None:
    sleep = FakeSleep()

    async def busy() -> None:
        raise UpstreamUnavailableError("429 system_busy", retry_after=60)

    with pytest.raises(RetryExhausted) as info:
        await call_with_retries(busy, budget(max_delay=30.0), sleep=sleep)
    assert info.value.attempts == 1 and sleep.waits == []
    assert info.value.error.retryable
    assert getattr(info.value.error, "retry_after", None) == 60


async def test_permanent_errors_are_not_retried() -> None:
    sleep = FakeSleep()

    async def invalid() -> None:
        raise InvalidRequestError("text: Field required", field="text")

    with pytest.raises(RetryExhausted) as info:
        await call_with_retries(invalid, budget(), sleep=sleep)
    assert info.value.attempts == 1 and sleep.waits == []
    assert info.value.error.code == "INVALID_REQUEST"


async def test_foreign_exceptions_become_internal_errors() -> None:
    async def bug() -> None:
        raise KeyError("oops")

    with pytest.raises(RetryExhausted) as info:
        await call_with_retries(bug, budget(), sleep=FakeSleep())
    assert info.value.error.code == "INTERNAL"
    assert isinstance(info.value.error.__cause__, KeyError)


# --- two layers, one budget ---


class Upstream:
    """A lower layer like the ElevenLabs backend: reports each call to the budget and
    retries transient failures while the budget lasts. ``script`` is what the calls
    raise, one entry each (``None``: success), then successes."""

    def __init__(self, script: list[Exception | None]) -> None:
        self.script = list(script)
        self.calls = 0

    async def call(self, budget: RetryBudget, sleep: FakeSleep) -> str:
        while True:
            budget.attempt()
            self.calls += 1
            error = self.script.pop(0) if self.script else None
            if error is None:
                return "audio"
            if isinstance(error, GenerationTimeoutError):
                raise error  # like a hang: left to the outer layer
            assert isinstance(error, UpstreamUnavailableError)
            wait = budget.retry(error)
            if wait is None:
                raise error
            await sleep(wait)


async def test_a_failing_upstream_gets_at_most_max_attempts_calls_across_both_layers() -> None:
    sleep = FakeSleep()
    request = budget(max_attempts=6)
    upstream = Upstream([UpstreamUnavailableError("500")] * 100)
    runs = 0

    async def handler() -> str:
        nonlocal runs
        runs += 1
        return await upstream.call(request, sleep)

    with pytest.raises(RetryExhausted) as info:
        await call_with_retries(handler, request, sleep=sleep)
    assert upstream.calls == 6 == info.value.attempts
    assert runs == 1  # the lower layer spent the budget; the loop had nothing left to retry
    assert len(sleep.waits) == 5


async def test_success_after_two_failures_uses_three_calls() -> None:
    request = budget()
    upstream = Upstream([UpstreamUnavailableError("500"), UpstreamUnavailableError("500")])

    async def handler() -> str:
        return await upstream.call(request, FakeSleep())

    result, attempts = await call_with_retries(handler, request, sleep=FakeSleep())
    assert (result, attempts, upstream.calls) == ("audio", 3, 3)


async def test_errors_the_lower_layer_leaves_are_retried_by_the_loop_from_the_same_budget(
) -> None:
    request = budget(max_attempts=4)
    timeout = GenerationTimeoutError("no audio within 30s")
    upstream = Upstream([UpstreamUnavailableError("500"), timeout, timeout, None])
    runs = 0

    async def handler() -> str:
        nonlocal runs
        runs += 1
        return await upstream.call(request, FakeSleep())

    result, attempts = await call_with_retries(handler, request, sleep=FakeSleep())
    assert result == "audio" and runs == 3
    assert attempts == upstream.calls == 4  # upstream calls, not runs


async def test_runs_that_report_nothing_count_one_each() -> None:
    request = budget(max_attempts=3)

    async def gpu() -> None:
        raise OutOfMemoryError("out of memory (a transient one)")

    with pytest.raises(RetryExhausted) as info:
        await call_with_retries(gpu, request, sleep=FakeSleep())
    assert info.value.attempts == 3


class _SpentOutOfMemory(OutOfMemoryError, RetriesSpent):
    def __init__(self, message: str, attempts: int) -> None:
        super().__init__(message)
        self.attempts = attempts


async def test_an_error_whose_retries_are_spent_is_not_retried_and_counts_its_attempts(
) -> None:
    sleep = FakeSleep()
    runs = 0

    async def gpu() -> None:
        nonlocal runs
        runs += 1
        raise _SpentOutOfMemory("out of GPU memory, even alone", attempts=2)

    with pytest.raises(RetryExhausted) as info:
        await call_with_retries(gpu, budget(), sleep=sleep)
    assert runs == 1 and sleep.waits == []
    assert info.value.attempts == 2
    assert info.value.error.retryable  # operators may still replay it on a bigger GPU


def test_a_run_in_progress_counts_one_attempt() -> None:
    request = budget()
    assert request.attempts == 0
    request.begin_run()
    assert request.attempts == 1  # e.g. cancelled while running
    request.attempt()
    assert request.attempts == 1  # the run's own call, not one more
    request.begin_run()
    assert request.attempts == 2
