"""The ElevenLabs backend reads upstream within bounds: a stream line of at most
MAX_LINE_BYTES, at most ERROR_BODY_BYTES of an error answer, and no more than the read
timeout without audio (a drip is cut off, a long stream making progress is not); its
messages name no exception; and the retries it makes reach the budget's listener
(``engine_retries_total``)."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from core.metrics import EngineMetrics
from core.outputs import OutputStore
from core.retry_budget import RetryBudget
from core.voice import BackoffPolicy, ElevenLabsBackend, ElevenLabsError, VoiceJob, VoiceService
from schemas.errors import EngineError, ErrorCode
from tests.support.elevenlabs_server import DEFAULT_KEY, ElevenLabsServer, Fault, RecordingSleep
from tests.support.hostile_http import HostileServer

RACHEL = "21m00Tcm4TlvDq8ikWAM"
STALL = 0.5  # the read timeout under test
OUTER = 10  # seconds: far beyond every bound under test; reaching it is the failure
FLOOD = 64 * 2**20  # more than the socket buffers hold: a client that stops reading shows


@pytest.fixture
def sleep() -> RecordingSleep:
    return RecordingSleep()


def backend_for(http: httpx.AsyncClient, api_url: str, sleep: RecordingSleep,
                **kwargs: Any) -> ElevenLabsBackend:
    kwargs.setdefault("retry", BackoffPolicy(max_attempts=1, rng=random.Random(7)))
    return ElevenLabsBackend(http, api_url, SecretStr(DEFAULT_KEY), sleep=sleep,
                             timeout=httpx.Timeout(STALL), **kwargs)


async def speak(backend: ElevenLabsBackend, store: OutputStore, text: str = "Hello.",
                budget: RetryBudget | None = None) -> None:
    async with asyncio.timeout(OUTER):
        await VoiceService(backend, store, RACHEL).generate(VoiceJob(text), budget=budget)


@pytest.fixture
async def hostile(request: pytest.FixtureRequest) -> AsyncIterator[HostileServer]:
    async with HostileServer(**request.param) as server:
        yield server


@pytest.mark.parametrize("hostile", [{"mode": "drip", "start": b'{"audio_base64": "'}],
                         indirect=True)
async def test_a_drip_without_a_whole_chunk_is_a_timeout(
        http: httpx.AsyncClient, hostile: HostileServer, sleep: RecordingSleep,
        store: OutputStore) -> None:
    started = time.monotonic()
    with pytest.raises(ElevenLabsError) as caught:
        await speak(backend_for(http, hostile.url + "/v1", sleep), store)
    assert caught.value.code == ErrorCode.TIMEOUT and caught.value.retryable
    assert time.monotonic() - started < STALL + 1.5
    assert await asyncio.wait_for(hostile.outcomes.get(), OUTER) == "cut"


@pytest.mark.parametrize("hostile", [{"mode": "flood", "start": b'{"audio_base64": "',
                                      "flood_bytes": FLOOD}], indirect=True)
async def test_an_endless_line_is_refused_unread(
        http: httpx.AsyncClient, hostile: HostileServer, sleep: RecordingSleep,
        store: OutputStore) -> None:
    with pytest.raises(ElevenLabsError) as caught:
        await speak(backend_for(http, hostile.url + "/v1", sleep), store)
    assert caught.value.code == ErrorCode.UPSTREAM_UNAVAILABLE
    assert caught.value.public_message == ("ElevenLabs sent a stream line that is not an "
                                           "audio chunk")
    assert await asyncio.wait_for(hostile.outcomes.get(), OUTER) == "cut"


@pytest.mark.parametrize("hostile", [{"mode": "flood", "status": 500, "flood_bytes": FLOOD}],
                         indirect=True)
async def test_of_a_huge_error_answer_only_the_start_is_read(
        http: httpx.AsyncClient, hostile: HostileServer, sleep: RecordingSleep,
        store: OutputStore) -> None:
    with pytest.raises(ElevenLabsError) as caught:
        await speak(backend_for(http, hostile.url + "/v1", sleep), store)
    assert caught.value.code == ErrorCode.UPSTREAM_UNAVAILABLE
    assert caught.value.public_message == "ElevenLabs unavailable (HTTP 500)"
    assert await asyncio.wait_for(hostile.outcomes.get(), OUTER) == "cut"


@pytest.mark.parametrize("hostile", [{"mode": "drip", "status": 503}], indirect=True)
async def test_a_dripping_error_answer_is_told_by_its_status(
        http: httpx.AsyncClient, hostile: HostileServer, sleep: RecordingSleep,
        store: OutputStore) -> None:
    with pytest.raises(ElevenLabsError) as caught:
        await speak(backend_for(http, hostile.url + "/v1", sleep), store)
    assert caught.value.public_message == "ElevenLabs unavailable (HTTP 503)"


async def test_a_long_stream_making_progress_outlasts_the_read_timeout(
        http: httpx.AsyncClient, sleep: RecordingSleep, store: OutputStore) -> None:
    server = ElevenLabsServer(seconds_per_char=0.02, chunk_interval=STALL * 0.4,
                              chunk_bytes=512)
    await server.start()
    try:
        started = time.monotonic()
        await speak(backend_for(http, server.api_url, sleep), store,
                    "A line long enough to stream for a while.")
        assert time.monotonic() - started > 2 * STALL  # longer than the bound, not cut off
        assert server.tts_requests()[0].chunks_sent > 2 * STALL / server.chunk_interval
    finally:
        await server.stop()


@pytest.mark.parametrize("hostile", [{"mode": "flood", "start": b"<html>oops</html>\n"}],
                         indirect=True)
async def test_a_line_that_is_no_chunk_names_no_exception(
        http: httpx.AsyncClient, hostile: HostileServer, sleep: RecordingSleep,
        store: OutputStore) -> None:
    with pytest.raises(ElevenLabsError) as caught:
        await speak(backend_for(http, hostile.url + "/v1", sleep), store)
    assert caught.value.public_message == ("ElevenLabs sent a stream line that is not an "
                                           "audio chunk")


async def test_unreachable_names_no_exception(
        http: httpx.AsyncClient, sleep: RecordingSleep, store: OutputStore,
        caplog: pytest.LogCaptureFixture) -> None:
    backend = backend_for(http, "http://127.0.0.1:9/v1", sleep,
                          retry=BackoffPolicy(max_attempts=2, rng=random.Random(1)))
    with pytest.raises(ElevenLabsError) as caught:
        await speak(backend, store)
    assert caught.value.public_message == "ElevenLabs unreachable"
    assert isinstance(caught.value.__cause__, httpx.ConnectError)  # kept for the log
    assert "ConnectError" in caplog.text  # the retry's log line says what failed


# --- retries reach the budget's listener ---


def retries(metrics: EngineMetrics, code: str) -> float:
    value = metrics.registry.get_sample_value(
        "engine_retries_total", {"kind": "voice", "error_code": code})
    return value or 0.0


async def test_a_budget_of_the_backends_own_tells_its_listener(
        http: httpx.AsyncClient, server: ElevenLabsServer, sleep: RecordingSleep,
        store: OutputStore) -> None:
    metrics = EngineMetrics(CollectorRegistry())

    def count(error: EngineError) -> None:
        metrics.retries.labels("voice", error.code).inc()

    server.faults = [Fault("server_error"), Fault("system_busy")]
    backend = backend_for(http, server.api_url, sleep, on_retry=count,
                          retry=BackoffPolicy(max_attempts=3, rng=random.Random(7)))
    await speak(backend, store)
    assert retries(metrics, "UPSTREAM_UNAVAILABLE") == 2 == len(sleep.calls)


async def test_a_requests_budget_tells_its_listener_of_the_backends_retries(
        http: httpx.AsyncClient, server: ElevenLabsServer, sleep: RecordingSleep,
        store: OutputStore) -> None:
    told: list[EngineError] = []
    server.faults = [Fault("server_error")] * 5
    backend = backend_for(http, server.api_url, sleep, on_retry=told.append)
    budget = RetryBudget(BackoffPolicy(max_attempts=3, rng=random.Random(3)),
                         on_retry=lambda error: told.append(error))
    with pytest.raises(ElevenLabsError):
        await speak(backend, store, budget=budget)
    assert len(server.tts_requests()) == 3
    assert [error.code for error in told] == [ErrorCode.UPSTREAM_UNAVAILABLE] * 2  # once each
