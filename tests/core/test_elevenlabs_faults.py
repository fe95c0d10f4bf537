"""What a caller learns of an ElevenLabs failure: the HTTP status and ElevenLabs' documented
code (with its message when it is about the request and safe), never a proxy's HTML page
or upstream's words about its own servers (those go to the log); 408 is transient; 401/403
go by the documented code. Upstreams here are real HTTP servers on 127.0.0.1: the local
ElevenLabs, or a raw one answering scripted bodies that the local ElevenLabs never sends."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from aiohttp import web
from pydantic import SecretStr

from core.outputs import OutputStore
from core.voice import (
    BackoffPolicy,
    ElevenLabsBackend,
    ElevenLabsError,
    VoiceJob,
    VoiceService,
    VoiceSettings,
)
from schemas.errors import ErrorCode
from tests.support.elevenlabs_server import DEFAULT_KEY, ElevenLabsServer, RecordingSleep

RACHEL = "21m00Tcm4TlvDq8ikWAM"
KEY = "sk_faults_key_0123456789abcdef"
CLOUDFLARE_502 = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad "
    "Gateway</h1></center>\r\n<hr><center>cloudflare</center>\r\n</body>\r\n</html>")
POD_503 = json.dumps({"detail": {
    "status": "service_unavailable",
    "message": "upstream connect error or disconnect/reset before headers. reset reason: "
               "connection termination, pod tts-worker-7f9c at 10.4.2.17:8080"}})


@dataclass
class Answer:
    status: int
    body: str
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


class RawUpstream:
    """An HTTP server on 127.0.0.1 answering ElevenLabs' text-to-speech path with
    ``answer``, whatever was asked; ``hits`` counts the requests."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.hits = 0
        self.api_url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/text-to-speech/{voice_id}/stream/with-timestamps", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.api_url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/v1"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        a = self.answer
        return web.Response(status=a.status, text=a.body, content_type=a.content_type,
                            headers=a.headers)


@pytest.fixture
async def raw() -> AsyncIterator[RawUpstream]:
    upstream = RawUpstream(Answer(500, ""))
    await upstream.start()
    yield upstream
    await upstream.stop()


@pytest.fixture
def sleep() -> RecordingSleep:
    return RecordingSleep()


def backend_for(http: httpx.AsyncClient, api_url: str, sleep: RecordingSleep,
                key: str = KEY) -> ElevenLabsBackend:
    return ElevenLabsBackend(http, api_url, SecretStr(key), sleep=sleep,
                             retry=BackoffPolicy(max_attempts=3, rng=random.Random(3)),
                             timeout=httpx.Timeout(2.0))


async def failure(backend: ElevenLabsBackend, tmp_path: Path,
                  settings: VoiceSettings | None = None) -> ElevenLabsError:
    with pytest.raises(ElevenLabsError) as caught:
        await backend.synthesize_to(tmp_path / "x.mp3", "Hello.", settings or VoiceSettings(RACHEL))
    return caught.value


# --- what reaches the caller ---


@pytest.mark.parametrize(("answer", "kept_out"), [
    (Answer(502, CLOUDFLARE_502, "text/html"), "cloudflare"),
    (Answer(503, POD_503), "10.4.2.17"),
    (Answer(500, '{"error": "NullPointerException at tts.Worker.run(Worker.java:88)"}'),
     "Worker.java"),
    (Answer(504, "upstream request timeout", "text/plain"), "upstream request timeout"),
])
async def test_an_upstream_failure_tells_the_caller_only_its_http_status(
    raw: RawUpstream, http: httpx.AsyncClient, sleep: RecordingSleep, tmp_path: Path,
    caplog: pytest.LogCaptureFixture, answer: Answer, kept_out: str,
) -> None:
    raw.answer = answer
    caplog.set_level(logging.WARNING, logger="core.voice.elevenlabs_faults")
    error = await failure(backend_for(http, raw.api_url, sleep), tmp_path)

    assert error.code == ErrorCode.UPSTREAM_UNAVAILABLE and error.retryable
    assert error.message == error.public_message == f"ElevenLabs unavailable (HTTP {answer.status})"
    assert error.attempts == raw.hits == 3  # still retried as a transient fault
    assert kept_out in caplog.text  # the operator still sees what upstream said


async def test_a_documented_code_is_named_but_a_message_about_servers_is_not(
    raw: RawUpstream, http: httpx.AsyncClient, sleep: RecordingSleep, tmp_path: Path
) -> None:
    raw.answer = Answer(404, json.dumps({"detail": {
        "status": "voice_not_found",
        "message": "voice lookup failed on voices-db-2.internal:5432"}}))
    error = await failure(backend_for(http, raw.api_url, sleep), tmp_path)
    assert error.code == ErrorCode.UPSTREAM_REJECTED and not error.retryable
    assert error.message == "ElevenLabs rejected the request (HTTP 404 voice_not_found)"
    assert (error.upstream_status, raw.hits) == ("voice_not_found", 1)


async def test_a_multi_line_or_overlong_message_is_kept_out(
    raw: RawUpstream, http: httpx.AsyncClient, sleep: RecordingSleep, tmp_path: Path
) -> None:
    for message in ("Text too long.\nTraceback (most recent call last):", "x" * 301):
        raw.answer = Answer(400, json.dumps({"detail": {
            "status": "max_character_limit_exceeded", "message": message}}))
        error = await failure(backend_for(http, raw.api_url, sleep), tmp_path)
        assert error.message == (
            "ElevenLabs rejected the request (HTTP 400 max_character_limit_exceeded)")


async def test_validation_errors_name_the_first_fields_and_count_the_rest(
    raw: RawUpstream, http: httpx.AsyncClient, sleep: RecordingSleep, tmp_path: Path
) -> None:
    items = [{"type": "less_than_equal", "loc": ["body", "voice_settings", name],
              "msg": "Input should be less than or equal to 1.0", "input": 9}
             for name in ("stability", "similarity_boost", "style", "speed")]
    items.append({"type": "x", "loc": ["body", "text"], "msg": "<b>see http://10.0.0.1/</b>",
                  "input": "secret text"})
    raw.answer = Answer(422, json.dumps({"detail": items}))
    error = await failure(backend_for(http, raw.api_url, sleep), tmp_path)
    assert error.code == ErrorCode.UPSTREAM_REJECTED
    assert error.message == (
        "ElevenLabs rejected the request (HTTP 422 validation_error): "
        "voice_settings.stability: Input should be less than or equal to 1.0; "
        "voice_settings.similarity_boost: Input should be less than or equal to 1.0; "
        "voice_settings.style: Input should be less than or equal to 1.0; and 2 more")


async def test_a_key_echoed_by_upstream_reaches_neither_the_caller_nor_the_log(
    raw: RawUpstream, http: httpx.AsyncClient, sleep: RecordingSleep, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    raw.answer = Answer(502, f"<html>bad gateway for xi-api-key {KEY}</html>", "text/html")
    error = await failure(backend_for(http, raw.api_url, sleep), tmp_path)
    assert KEY not in f"{error} {error!r}" and KEY not in caplog.text
    assert "bad gateway for xi-api-key ***" in caplog.text


# --- 408 is transient ---


async def test_a_408_is_retried_honouring_retry_after(
    raw: RawUpstream, http: httpx.AsyncClient, sleep: RecordingSleep, tmp_path: Path
) -> None:
    raw.answer = Answer(408, "Request Timeout", "text/plain", {"Retry-After": "2"})
    error = await failure(backend_for(http, raw.api_url, sleep), tmp_path)
    assert error.code == ErrorCode.UPSTREAM_UNAVAILABLE and error.retryable
    assert error.message == "ElevenLabs unavailable (HTTP 408)"
    assert error.attempts == raw.hits == 3
    assert len(sleep.calls) == 2 and all(wait >= 2.0 for wait in sleep.calls)


# --- 401 and 403 go by the documented code ---


async def test_a_format_above_the_plan_names_output_format_not_the_key(
    http: httpx.AsyncClient, sleep: RecordingSleep, store: OutputStore
) -> None:
    upstream = ElevenLabsServer(tier="starter", seconds_per_char=0.004)
    await upstream.start()
    try:
        service = VoiceService(backend_for(http, upstream.api_url, sleep, key=DEFAULT_KEY),
                               store, RACHEL)
        with pytest.raises(ElevenLabsError) as caught:
            await service.generate(VoiceJob("Hello.", output_format="pcm_44100",
                                            inject_emotion=False))
    finally:
        await upstream.stop()
    error = caught.value
    assert error.code == ErrorCode.UPSTREAM_REJECTED and not error.retryable
    assert (error.http_status, error.upstream_status) == (403, "output_format_not_allowed")
    assert "output_format pcm_44100" in error.public_message
    assert "ELEVENLABS_API_KEY" not in error.public_message
    assert upstream.tts_calls == 1 and sleep.calls == []


@pytest.mark.parametrize(("status", "code"), [
    (401, "invalid_api_key"), (403, "missing_permissions"), (401, "some_new_auth_code"),
])
async def test_an_auth_failure_says_to_check_the_key(
    raw: RawUpstream, http: httpx.AsyncClient, sleep: RecordingSleep, tmp_path: Path,
    status: int, code: str,
) -> None:
    raw.answer = Answer(status, json.dumps({"detail": {"status": code, "message": "Denied."}}))
    error = await failure(backend_for(http, raw.api_url, sleep), tmp_path)
    assert error.code == ErrorCode.UPSTREAM_REJECTED and raw.hits == 1
    assert "check ELEVENLABS_API_KEY" in error.message
    assert "some_new_auth_code" not in error.message  # undocumented codes stay in the log


async def test_a_403_without_an_auth_code_is_not_blamed_on_the_key(
    raw: RawUpstream, http: httpx.AsyncClient, sleep: RecordingSleep, tmp_path: Path
) -> None:
    raw.answer = Answer(403, "<html><h1>Access denied</h1> Ray ID: 8f2c</html>", "text/html")
    error = await failure(backend_for(http, raw.api_url, sleep), tmp_path)
    assert error.code == ErrorCode.UPSTREAM_REJECTED and not error.retryable
    assert error.message == "ElevenLabs rejected the request (HTTP 403)"


# --- the local ElevenLabs keeps to the tiers the OpenAPI document names ---


@pytest.mark.parametrize(("tier", "fmt", "status"), [
    ("free", "pcm_44100", 403), ("free", "mp3_44100_192", 403),
    ("starter", "mp3_44100_192", 403), ("creator", "mp3_44100_192", 200),
    ("creator", "pcm_44100", 403), ("pro", "pcm_44100", 200), ("free", "pcm_24000", 200),
])
async def test_the_local_server_refuses_formats_above_its_tier(
    http: httpx.AsyncClient, tier: str, fmt: str, status: int
) -> None:
    upstream = ElevenLabsServer(tier=tier, seconds_per_char=0.002)
    await upstream.start()
    try:
        response = await http.post(
            f"{upstream.api_url}/text-to-speech/{RACHEL}/stream/with-timestamps",
            params={"output_format": fmt}, json={"text": "Hi."},
            headers={"xi-api-key": DEFAULT_KEY})
    finally:
        await upstream.stop()
    assert response.status_code == status
    if status == 403:
        detail = response.json()["detail"]
        assert detail["status"] == "output_format_not_allowed" and fmt in detail["message"]


def test_the_local_server_refuses_an_unknown_tier() -> None:
    with pytest.raises(ValueError, match="tier must be one of free, starter, creator"):
        ElevenLabsServer(tier="platinum")
