import random

import pytest

from consumers.retry import RetryExhausted, RetryPolicy, call_with_retries
from schemas.errors import InvalidRequestError, UpstreamUnavailableError


class FakeSleep:
    """Records the waits instead of sleeping."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def policy(**kw: float) -> RetryPolicy:
    return RetryPolicy(rng=random.Random(7), **kw)  # type: ignore[arg-type]


async def test_transient_errors_are_retried_then_succeed() -> None:
    sleep = FakeSleep()
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise UpstreamUnavailableError("503 from upstream")
        return "ok"

    result, attempts = await call_with_retries(flaky, policy(max_attempts=4), sleep=sleep)
    assert (result, attempts, calls) == ("ok", 3, 3)
    assert len(sleep.waits) == 2


async def test_backoff_is_capped_and_exhaustion_reports_attempts() -> None:
    sleep = FakeSleep()

    async def down() -> None:
        raise UpstreamUnavailableError("connection refused")

    with pytest.raises(RetryExhausted) as info:
        await call_with_retries(
            down, policy(max_attempts=6, base_delay=1.0, max_delay=3.0), sleep=sleep
        )
    assert info.value.attempts == 6
    assert info.value.error.retryable
    assert len(sleep.waits) == 5
    assert all(0 <= w <= 3.0 for w in sleep.waits)
    for attempt, wait in enumerate(sleep.waits, start=1):
        assert wait <= min(3.0, 1.0 * 2 ** (attempt - 1))


async def test_retry_after_is_honoured_up_to_the_cap() -> None:
    sleep = FakeSleep()

    async def busy() -> None:
        raise UpstreamUnavailableError("429 system_busy", retry_after=2.5)

    with pytest.raises(RetryExhausted):
        await call_with_retries(busy, policy(max_attempts=3, base_delay=0.01), sleep=sleep)
    assert sleep.waits and all(w >= 2.5 for w in sleep.waits)


async def test_permanent_errors_are_not_retried() -> None:
    sleep = FakeSleep()

    async def invalid() -> None:
        raise InvalidRequestError("text: Field required", field="text")

    with pytest.raises(RetryExhausted) as info:
        await call_with_retries(invalid, policy(), sleep=sleep)
    assert info.value.attempts == 1 and sleep.waits == []
    assert info.value.error.code == "INVALID_REQUEST"


async def test_foreign_exceptions_become_internal_errors() -> None:
    async def bug() -> None:
        raise KeyError("oops")

    with pytest.raises(RetryExhausted) as info:
        await call_with_retries(bug, policy(), sleep=FakeSleep())
    assert info.value.error.code == "INTERNAL"
    assert isinstance(info.value.error.__cause__, KeyError)
