"""The ElevenLabs backend end to end: Kafka and HTTP reach the same core entry, against a
faithful local ElevenLabs server; the key never leaks; one retry budget per request bounds
the upstream calls of the consume loop and the backend together."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any

import aiohttp
import pytest
from pydantic import SecretStr

from consumers.engine import Engine
from core.settings import Settings
from tests.integration.conftest import running_engine
from tests.support.elevenlabs_server import DEFAULT_KEY, ElevenLabsServer, Fault
from tests.support.kafka_client import PersonaPeer

pytestmark = pytest.mark.kafka


def eleven_labs_engine(settings: Settings, upstream: ElevenLabsServer, **overrides: Any
                       ) -> AbstractAsyncContextManager[Engine]:
    """An engine on the ElevenLabs backend (``auto``, with a key) against ``upstream``."""
    return running_engine(
        settings, voice_backend="auto", elevenlabs_api_key=SecretStr(DEFAULT_KEY),
        elevenlabs_api_url=upstream.api_url, elevenlabs_model_id="eleven_multilingual_v2",
        **overrides)


@pytest.fixture
async def eleven_engine(settings: Settings, upstream: ElevenLabsServer) -> AsyncIterator[Engine]:
    """RETRY_MAX_ATTEMPTS at its default (6), waits of at most 0.05 s."""
    async with eleven_labs_engine(settings, upstream) as engine:
        yield engine


def voice_request(conversation: str, text: str = "Are you there?") -> dict[str, Any]:
    return {"request_id": str(uuid.uuid4()), "conversation_id": conversation, "text": text}


async def test_kafka_and_http_give_the_same_result(
    eleven_engine: Engine, peer: PersonaPeer, upstream: ElevenLabsServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    text = "I missed you so much! Tell me everything about your day."
    body = {"text": text, "voice_id": "21m00Tcm4TlvDq8ikWAM", "stability": 0.4,
            "similarity_boost": 0.7, "style": 0.1}
    request: dict[str, Any] = {"request_id": str(uuid.uuid4()), "conversation_id": "conv-el",
                               **body}
    await peer.publish("voice", request)
    via_kafka = (await peer.answers_for([request["request_id"]]))[request["request_id"]]
    assert via_kafka.kind == "completed", via_kafka.event
    assert eleven_engine.addresses is not None
    async with aiohttp.ClientSession() as session:
        async with session.post(eleven_engine.addresses.http_url + "/generate/voice",
                                json=body) as response:
            assert response.status == 200
            via_http = await response.json()
        async with session.get(eleven_engine.addresses.http_url + "/health") as response:
            health = await response.text()

    assert via_http["enhanced_text"] == via_kafka.event["enhanced_text"]
    assert via_http["voice_id"] == via_kafka.event["voice_id"] == body["voice_id"]
    assert via_http["duration_seconds"] == pytest.approx(via_kafka.event["duration_seconds"],
                                                         abs=0.05)
    sent = upstream.tts_requests()
    assert len(sent) == 2
    seeds = [r.json.pop("seed") for r in sent]  # each derived from its own request_id
    assert (via_kafka.event["seed"], via_http["seed"]) == tuple(seeds)
    assert seeds[0] != seeds[1]
    assert sent[0].json == sent[1].json  # otherwise the very same upstream request
    assert sent[0].json["model_id"] == "eleven_multilingual_v2"
    assert "[" not in sent[0].json["text"]  # a non-v3 model never gets audio tags

    assert '"backend": "elevenlabs"' in health
    for where in (caplog.text, str(via_kafka.event), str(via_http), health):
        assert DEFAULT_KEY not in where


async def test_quota_exceeded_becomes_a_failed_event(
    eleven_engine: Engine, peer: PersonaPeer, upstream: ElevenLabsServer,
) -> None:
    upstream.character_limit = 0
    request: dict[str, Any] = {"request_id": str(uuid.uuid4()), "conversation_id": "conv-q",
                               "text": "Hello again!"}
    await peer.publish("voice", request)
    answer = (await peer.answers_for([request["request_id"]]))[request["request_id"]]
    assert answer.kind == "failed"
    assert answer.event["error_code"] == "QUOTA_EXCEEDED"
    assert answer.event["retryable"] is False and answer.event["attempts"] == 1


# --- one retry budget per request ---


async def test_an_upstream_answering_500_gets_six_calls_and_the_event_counts_them(
    eleven_engine: Engine, peer: PersonaPeer, upstream: ElevenLabsServer,
) -> None:
    upstream.faults = [Fault("server_error")] * 50
    request = voice_request("conv-500")
    await peer.publish("voice", request)
    answer = (await peer.answers_for([request["request_id"]]))[request["request_id"]]
    assert answer.kind == "failed"
    assert answer.event["error_code"] == "UPSTREAM_UNAVAILABLE"
    assert answer.event["retryable"] is True
    calls = len(upstream.tts_requests())
    assert calls == 6 == answer.event["attempts"]  # not 4 loop runs x 3 backend requests


async def test_a_success_after_two_failures_uses_three_calls(
    eleven_engine: Engine, peer: PersonaPeer, upstream: ElevenLabsServer,
) -> None:
    upstream.faults = [Fault("server_error"), Fault("server_error_detail")]
    request = voice_request("conv-flaky")
    await peer.publish("voice", request)
    answer = (await peer.answers_for([request["request_id"]]))[request["request_id"]]
    assert answer.kind == "completed", answer.event
    assert [r.status for r in upstream.tts_requests()] == [500, 500, 200]


async def test_a_429_retry_after_is_waited_out_in_full(
    settings: Settings, peer: PersonaPeer, upstream: ElevenLabsServer,
) -> None:
    async with eleven_labs_engine(settings, upstream, retry_max_delay=5.0):
        upstream.faults = [Fault("system_busy", retry_after=1)]
        request = voice_request("conv-busy")
        await peer.publish("voice", request)
        answer = (await peer.answers_for([request["request_id"]]))[request["request_id"]]
    assert answer.kind == "completed", answer.event
    first, second = upstream.tts_requests()
    assert (first.status, second.status) == (429, 200)
    assert second.at - first.at >= 1.0


async def test_a_retry_after_beyond_the_cap_fails_at_once_and_retryable(
    eleven_engine: Engine, peer: PersonaPeer, upstream: ElevenLabsServer,
) -> None:
    upstream.faults = [Fault("system_busy", retry_after=1)]  # RETRY_MAX_DELAY is 0.05 s
    request = voice_request("conv-later")
    await peer.publish("voice", request)
    answer = (await peer.answers_for([request["request_id"]]))[request["request_id"]]
    assert answer.kind == "failed"
    assert answer.event["error_code"] == "UPSTREAM_UNAVAILABLE"
    assert answer.event["retryable"] is True and answer.event["attempts"] == 1
    assert len(upstream.tts_requests()) == 1
