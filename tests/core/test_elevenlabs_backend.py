"""The ElevenLabs backend against a faithful local ElevenLabs (tests/support/elevenlabs_server):
request bodies, every fault with its code and number of attempts, Retry-After, the request's
retry budget, concurrency, long text in chunks joined into one MP3, and the key kept out of
logs and errors."""

from __future__ import annotations

import asyncio
import logging
import os
import random
from pathlib import Path
from typing import Any

import httpx
import mutagen.mp3
import pytest
from pydantic import SecretStr

from core.outputs import OutputStore
from core.retry_budget import RetryBudget
from core.voice import (
    BackoffPolicy,
    ElevenLabsBackend,
    ElevenLabsError,
    VoiceJob,
    VoiceService,
    VoiceSettings,
    audio_duration,
)
from core.voice.elevenlabs_faults import parse_retry_after
from schemas.errors import EngineError, ErrorCode
from tests.support.elevenlabs_server import DEFAULT_KEY, ElevenLabsServer, Fault, RecordingSleep

RACHEL = "21m00Tcm4TlvDq8ikWAM"
SARAH = "EXAVITQu4vr4xnSDxMaL"


@pytest.fixture
def sleep() -> RecordingSleep:
    return RecordingSleep()


@pytest.fixture
def store(tmp_path: Path) -> OutputStore:
    return OutputStore(tmp_path / "outputs")


def make_backend(
    http: httpx.AsyncClient, server: ElevenLabsServer, sleep: RecordingSleep, **kwargs: Any
) -> ElevenLabsBackend:
    kwargs.setdefault("timeout", httpx.Timeout(2.0))
    kwargs.setdefault("retry", BackoffPolicy(rng=random.Random(7)))
    key = kwargs.pop("key", DEFAULT_KEY)
    return ElevenLabsBackend(http, server.api_url, SecretStr(key), sleep=sleep, **kwargs)


@pytest.fixture
def backend(
    http: httpx.AsyncClient, server: ElevenLabsServer, sleep: RecordingSleep
) -> ElevenLabsBackend:
    return make_backend(http, server, sleep)


@pytest.fixture
def service(backend: ElevenLabsBackend, store: OutputStore) -> VoiceService:
    return VoiceService(backend, store, RACHEL)


def mp3_info(path: Path) -> Any:
    """What an independent reader (mutagen, not libsndfile) sees of the file."""
    return mutagen.mp3.MP3(path).info  # type: ignore[no-untyped-call]


def files(store: OutputStore) -> list[str]:
    """The audio outputs (the characters' timings beside them left out)."""
    return [name for name in os.listdir(store.directory) if not name.endswith(".json")]


# --- the request, as the OpenAPI document says ---


async def test_request_carries_key_format_model_and_only_the_given_settings(
    service: VoiceService, server: ElevenLabsServer, store: OutputStore
) -> None:
    result = await service.generate(
        VoiceJob("Hello, I'm Sarah.", voice_id=SARAH, stability=0.3, similarity_boost=0.8,
                 style=0.1, inject_emotion=False)
    )
    plain = await service.generate(VoiceJob("Hello again.", inject_emotion=False))

    first, second = server.tts_requests()
    assert first.path == f"/v1/text-to-speech/{SARAH}/stream/with-timestamps"
    assert first.query == {"output_format": "mp3_44100_128"}
    assert first.key == "ok"
    assert first.json == {
        "text": "Hello, I'm Sarah.", "model_id": "eleven_multilingual_v2",
        "voice_settings": {"stability": 0.3, "similarity_boost": 0.8, "style": 0.1},
    }
    assert second.json == {"text": "Hello again.", "model_id": "eleven_multilingual_v2"}
    assert result.voice_id == SARAH and plain.voice_id == RACHEL
    path = store.resolve(result.filename)
    assert path is not None and path.read_bytes() == server.audio_sent("Hello, I'm Sarah.")
    assert result.duration_seconds == pytest.approx(audio_duration(path), abs=0.001)
    assert result.duration_seconds == pytest.approx(
        server.audio_seconds("Hello, I'm Sarah."), abs=0.03)


async def test_output_format_and_default_model_come_from_the_backend(
    http: httpx.AsyncClient, server: ElevenLabsServer, sleep: RecordingSleep, store: OutputStore
) -> None:
    backend = make_backend(http, server, sleep, output_format="mp3_22050_32",
                           default_model_id="eleven_flash_v2_5")
    result = await VoiceService(backend, store, RACHEL).generate(VoiceJob("Hi.", inject_emotion=False))
    (sent,) = server.tts_requests()
    assert sent.query == {"output_format": "mp3_22050_32"}
    assert sent.json["model_id"] == "eleven_flash_v2_5"
    path = store.resolve(result.filename)
    assert path is not None and mp3_info(path).sample_rate == 22050


# --- faults: code, attempts, waits (the default budget: 6 attempts per request) ---

FAULTS = [
    # script, expected code, upstream status, attempts, waits
    ([Fault("too_many_concurrent_requests")] * 6, ErrorCode.UPSTREAM_UNAVAILABLE,
     "too_many_concurrent_requests", 6, 5),
    ([Fault("system_busy")] * 6, ErrorCode.UPSTREAM_UNAVAILABLE, "system_busy", 6, 5),
    ([Fault("server_error")] * 6, ErrorCode.UPSTREAM_UNAVAILABLE, None, 6, 5),
    ([Fault("server_error_detail")] * 6, ErrorCode.UPSTREAM_UNAVAILABLE, "internal_error", 6, 5),
    ([Fault("drop")] * 6, ErrorCode.UPSTREAM_UNAVAILABLE, None, 6, 5),
    ([Fault("quota_exceeded")], ErrorCode.QUOTA_EXCEEDED, "quota_exceeded", 1, 0),
]


@pytest.mark.parametrize(("script", "code", "upstream", "attempts", "waits"), FAULTS,
                         ids=lambda v: v[0].kind if isinstance(v, list) else None)
async def test_each_fault_maps_to_its_code_after_the_expected_attempts(
    service: VoiceService, server: ElevenLabsServer, sleep: RecordingSleep, store: OutputStore,
    script: list[Fault], code: ErrorCode, upstream: str | None, attempts: int, waits: int,
) -> None:
    server.faults = list(script)
    with pytest.raises(ElevenLabsError) as caught:
        await service.generate(VoiceJob("Are you there?"))
    error = caught.value
    assert error.code == code
    assert error.retryable == (code == ErrorCode.UPSTREAM_UNAVAILABLE)
    assert error.upstream_status == upstream
    assert error.attempts == attempts == len(server.tts_requests())
    assert len(sleep.calls) == waits
    assert all(0 <= s <= 8.0 for s in sleep.calls)
    assert files(store) == []


async def test_a_hang_is_a_timeout_after_one_attempt(
    http: httpx.AsyncClient, server: ElevenLabsServer, sleep: RecordingSleep, store: OutputStore
) -> None:
    backend = make_backend(http, server, sleep, timeout=httpx.Timeout(0.2))
    server.faults = [Fault("hang")]
    with pytest.raises(ElevenLabsError) as caught:
        await VoiceService(backend, store, RACHEL).generate(VoiceJob("Hello?"))
    assert caught.value.code == ErrorCode.TIMEOUT and caught.value.retryable
    assert caught.value.attempts == 1 and sleep.calls == []
    assert files(store) == []


async def test_retry_after_is_waited_and_the_retry_succeeds_with_one_file(
    service: VoiceService, server: ElevenLabsServer, sleep: RecordingSleep, store: OutputStore
) -> None:
    server.faults = [Fault("system_busy", retry_after=3), Fault("drop")]
    result = await service.generate(VoiceJob("Still there?"))
    assert sleep.calls[0] == 3.0
    assert len(sleep.calls) == 2 and sleep.calls[1] <= 1.0  # second wait: backoff, no header
    assert [r.status for r in server.tts_requests()] == [429, 200, 200]
    assert files(store) == [result.filename]


async def test_retry_after_on_the_last_attempt_is_reported(
    service: VoiceService, server: ElevenLabsServer, sleep: RecordingSleep
) -> None:
    server.faults = [Fault("too_many_concurrent_requests", retry_after=1)] * 6
    with pytest.raises(ElevenLabsError) as caught:
        await service.generate(VoiceJob("Hi."))
    assert len(sleep.calls) == 5 and all(wait >= 1.0 for wait in sleep.calls)
    assert getattr(caught.value, "retry_after", None) == 1.0


async def test_a_retry_after_longer_than_the_cap_goes_up_at_once(
    service: VoiceService, server: ElevenLabsServer, sleep: RecordingSleep
) -> None:
    server.faults = [Fault("system_busy", retry_after=120)]
    with pytest.raises(ElevenLabsError) as caught:
        await service.generate(VoiceJob("Hi."))
    assert caught.value.attempts == 1 and sleep.calls == []
    assert getattr(caught.value, "retry_after", None) == 120.0 and caught.value.retryable


async def test_unreachable_upstream_is_retried_then_unavailable(
    http: httpx.AsyncClient, sleep: RecordingSleep, store: OutputStore
) -> None:
    backend = ElevenLabsBackend(http, "http://127.0.0.1:9/v1", SecretStr(DEFAULT_KEY),
                                sleep=sleep, retry=BackoffPolicy(max_attempts=2))
    with pytest.raises(ElevenLabsError) as caught:
        await VoiceService(backend, store, RACHEL).generate(VoiceJob("Hi."))
    assert caught.value.code == ErrorCode.UPSTREAM_UNAVAILABLE
    assert caught.value.attempts == 2 and len(sleep.calls) == 1


# --- one retry budget per request ---


async def test_an_upstream_answering_500_always_gets_at_most_the_budget(
    service: VoiceService, server: ElevenLabsServer, sleep: RecordingSleep
) -> None:
    server.faults = [Fault("server_error")] * 50
    request = RetryBudget(BackoffPolicy(max_attempts=6, rng=random.Random(3)))
    with pytest.raises(ElevenLabsError) as caught:
        await service.generate(VoiceJob("Anyone?"), budget=request)
    assert len(server.tts_requests()) == 6 == caught.value.attempts == request.attempts
    assert len(sleep.calls) == 5 and request.retries_left == 0
    # the same request tried again (say, by the consume loop) has no retry left: one call
    with pytest.raises(ElevenLabsError) as again:
        await service.generate(VoiceJob("Anyone?"), budget=request)
    assert len(server.tts_requests()) == 7 == again.value.attempts
    assert len(sleep.calls) == 5


async def test_a_success_after_two_failures_uses_three_calls(
    service: VoiceService, server: ElevenLabsServer, sleep: RecordingSleep, store: OutputStore
) -> None:
    server.faults = [Fault("server_error"), Fault("server_error_detail")]
    request = RetryBudget(BackoffPolicy())
    result = await service.generate(VoiceJob("Third time lucky."), budget=request)
    assert [r.status for r in server.tts_requests()] == [500, 500, 200]
    assert request.attempts == 3 and len(sleep.calls) == 2
    assert files(store) == [result.filename]


async def test_a_text_in_parts_shares_one_budget(
    service: VoiceService, server: ElevenLabsServer, store: OutputStore
) -> None:
    server.faults = [Fault("server_error")] * 50
    request = RetryBudget(BackoffPolicy(max_attempts=4))
    with pytest.raises(ElevenLabsError):
        await service.generate(VoiceJob(long_text(70), model_id="eleven_v3",
                                        inject_emotion=False), budget=request)
    # three parts: their first calls, then at most 3 retries among them all
    assert 3 < len(server.tts_requests()) <= 3 + 3
    assert request.retries_left == 0 and files(store) == []


@pytest.mark.parametrize(
    ("settings", "status", "upstream", "in_message"),
    [
        (VoiceSettings(RACHEL, stability=1.5), 422, "validation_error",
         "voice_settings.stability: Input should be less than or equal to 1.0"),
        (VoiceSettings(RACHEL, speed=2.0), 422, "validation_error", "voice_settings.speed"),
        (VoiceSettings(RACHEL, model_id="eleven_nonexistent"), 400, "model_not_found",
         "eleven_nonexistent does not exist"),
        (VoiceSettings("NoSuchVoice"), 404, "voice_not_found", "NoSuchVoice was not found"),
    ],
)
async def test_rejections_carry_upstreams_message_and_are_not_retried(
    backend: ElevenLabsBackend, sleep: RecordingSleep, tmp_path: Path,
    settings: VoiceSettings, status: int, upstream: str, in_message: str,
) -> None:
    with pytest.raises(ElevenLabsError) as caught:
        await backend.synthesize_to(tmp_path / "x.mp3", "Hello.", settings)
    error = caught.value
    assert error.code == ErrorCode.UPSTREAM_REJECTED and not error.retryable
    assert (error.http_status, error.upstream_status, error.attempts) == (status, upstream, 1)
    assert in_message in error.message
    assert sleep.calls == [] and not (tmp_path / "x.mp3").exists()


async def test_wrong_key_is_rejected_without_naming_any_key(
    http: httpx.AsyncClient, server: ElevenLabsServer, sleep: RecordingSleep, store: OutputStore
) -> None:
    wrong = "sk_wrong_key_0123456789"
    backend = make_backend(http, server, sleep, key=wrong)
    with pytest.raises(ElevenLabsError) as caught:
        await VoiceService(backend, store, RACHEL).generate(VoiceJob("Hi."))
    error = caught.value
    assert error.code == ErrorCode.UPSTREAM_REJECTED and error.attempts == 1
    assert error.upstream_status == "invalid_api_key"
    assert wrong not in str(error) and DEFAULT_KEY not in str(error)
    assert "ELEVENLABS_API_KEY" in error.message


def test_retry_after_header_forms() -> None:
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after("0.5") == 0.5
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412490.0) == 0.0


# --- concurrency ---


async def test_concurrency_stays_within_the_limit_so_upstream_never_refuses(
    http: httpx.AsyncClient, server: ElevenLabsServer, sleep: RecordingSleep, store: OutputStore
) -> None:
    server.max_concurrency = 2
    server.latency = 0.02
    backend = make_backend(http, server, sleep, max_concurrency=2)
    service = VoiceService(backend, store, RACHEL)
    results = await asyncio.gather(
        *(service.generate(VoiceJob(f"Message number {i}.")) for i in range(8))
    )
    assert len({r.filename for r in results}) == 8
    assert server.peak_in_flight == 2
    assert all(r.status == 200 for r in server.tts_requests()) and sleep.calls == []


# --- long text ---


def long_text(sentences: int) -> str:
    return " ".join(
        f"This is sentence number {i} of a long story, told slowly and with care." for i in
        range(sentences)
    )


async def test_long_text_is_chunked_and_joined_into_one_mp3(
    service: VoiceService, server: ElevenLabsServer, store: OutputStore
) -> None:
    text = long_text(70)  # ~5,000 characters: v3 takes 3,000, in chunks of 2,000
    result = await service.generate(VoiceJob(text, model_id="eleven_v3", inject_emotion=False))

    sent = server.tts_requests()
    chunks = [r.json["text"] for r in sent]
    assert len(chunks) == 3 and all(len(c) <= 2_000 for c in chunks)
    assert all(c.endswith(".") for c in chunks)  # cut at sentence ends
    assert " ".join(chunks) == text == result.enhanced_text
    # v3 refuses previous_text/next_text (test_elevenlabs_stitching.py: the other models)
    assert not any({"previous_text", "next_text"} & set(r.json) for r in sent)
    assert all(r.json["model_id"] == "eleven_v3" for r in sent)

    assert files(store) == [result.filename]
    path = store.resolve(result.filename)
    assert path is not None
    parts = sum(r.audio_seconds or 0 for r in sent)
    assert abs(result.duration_seconds - parts) <= 0.05 * (len(sent) - 1) + 0.01
    assert mp3_info(path).length == pytest.approx(result.duration_seconds, abs=0.002)


async def test_multilingual_v2_takes_ten_thousand_characters_per_request(
    http: httpx.AsyncClient, server: ElevenLabsServer, sleep: RecordingSleep, store: OutputStore
) -> None:
    server.seconds_per_char = 0.0005
    service = VoiceService(make_backend(http, server, sleep), store, RACHEL,
                           max_text_chars=30_000)
    text = long_text(150)  # ~10,700 characters
    await service.generate(VoiceJob(text, inject_emotion=False))
    lengths = [len(r.json["text"]) for r in server.tts_requests()]
    assert len(lengths) == 2 and max(lengths) <= 10_000


async def test_a_failing_chunk_fails_the_whole_request_and_leaves_no_file(
    service: VoiceService, server: ElevenLabsServer, store: OutputStore
) -> None:
    server.faults = [Fault("quota_exceeded")]
    with pytest.raises(EngineError) as caught:
        await service.generate(VoiceJob(long_text(70), model_id="eleven_v3"))
    assert caught.value.code == ErrorCode.QUOTA_EXCEEDED
    assert files(store) == []


# --- the key stays secret ---


async def test_the_key_never_appears_in_logs_errors_or_repr(
    http: httpx.AsyncClient, sleep: RecordingSleep, store: OutputStore,
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret = "sk_secret_do_not_print_31337"
    caplog.set_level(logging.DEBUG)
    server = ElevenLabsServer(api_key=secret, seconds_per_char=0.004)
    await server.start()
    try:
        backend = make_backend(http, server, sleep, key=secret)
        service = VoiceService(backend, store, RACHEL)
        server.faults = [Fault("system_busy", retry_after=1), Fault("server_error")]
        await service.generate(VoiceJob("Hello!"))
        errors: list[BaseException] = []
        for script in ([Fault("quota_exceeded")], [Fault("drop")] * 6):
            server.faults = list(script)
            try:
                await service.generate(VoiceJob("Hello!"))
            except EngineError as exc:
                errors.append(exc)
        server.api_key = "another"  # the secret is now wrong: a 401
        try:
            await service.generate(VoiceJob("Hello!"))
        except EngineError as exc:
            errors.append(exc)
    finally:
        await server.stop()
    assert len(errors) == 3 and caplog.text
    assert secret not in caplog.text
    assert all(secret not in f"{e!r} {e} {e.__cause__!r}" for e in errors)
    assert secret not in repr(backend)
    assert all(secret not in repr(r) for r in server.received)
