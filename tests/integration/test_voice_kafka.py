"""Voice end to end through the real broker: request event → MP3 served over HTTP."""

from __future__ import annotations

import io
import logging
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import mutagen.mp3
import pytest

from consumers.engine import Engine
from tests.support.kafka_client import PersonaPeer
from tests.support.settings import plaintext

pytestmark = pytest.mark.kafka


def voice_request(text: str = "Hello, I'm Sarah! How can I help you today?", **extra: Any
                  ) -> dict[str, Any]:
    return {"request_id": str(uuid.uuid4()), "conversation_id": f"conv-{uuid.uuid4().hex[:6]}",
            "text": text, **extra}


async def fetch(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, Any]:
    async with aiohttp.ClientSession() as session, \
            session.get(url, headers=headers) as response:
        return response.status, await response.read(), response.headers


@pytest.mark.parametrize("encoding", ["json", "avro"])
async def test_voice_request_completes_with_a_playable_mp3(
    engine: Engine, peer: PersonaPeer, encoding: str
) -> None:
    request = voice_request(character_id="sarah")
    await peer.publish("voice", request, encoding=encoding)
    answer = (await peer.answers_for([request["request_id"]]))[request["request_id"]]

    assert answer.kind == "completed", answer.event
    event = answer.event
    assert event["kind"] == "voice"
    assert event["conversation_id"] == request["conversation_id"]
    assert answer.key == request["conversation_id"].encode()
    assert answer.headers["content-type"] == b"avro/binary"  # EVENT_ENCODING default
    assert answer.headers["request_id"] == request["request_id"].encode()
    assert event["url"] == f"/outputs/{event['filename']}"
    assert event["filename"] == f"{event['audio_id']}.mp3"
    assert event["text"] == request["text"]

    assert engine.addresses is not None
    status, body, headers = await fetch(engine.addresses.http_url + event["url"])
    assert status == 200 and headers["Content-Type"] == "audio/mpeg"
    duration = mutagen.mp3.MP3(io.BytesIO(body)).info.length
    assert abs(duration - event["duration_seconds"]) < 0.05
    assert 0.5 < duration < 15


async def test_emotion_tags_are_not_spoken_by_the_local_voice(
    engine: Engine, peer: PersonaPeer
) -> None:
    request = voice_request("[warmly] Hello there. [laughs] It is good to see you.")
    await peer.publish("voice", request)
    event = (await peer.answers_for([request["request_id"]]))[request["request_id"]].event
    assert event["text"] == request["text"]
    assert "[" not in event["enhanced_text"] and "Hello there" in event["enhanced_text"]


async def test_garbage_becomes_undecodable_and_the_partition_moves_on(
    engine: Engine, peer: PersonaPeer
) -> None:
    key = "conv-garbage"
    partition, offset = await peer.publish("voice", b"\x00\xffnot an event", key=key)
    good = voice_request(conversation_id=key)
    await peer.publish("voice", good)

    failed = await peer.wait_for(lambda a: a.kind == "failed" and a.event["source_offset"] == offset
                                 and a.event["source_partition"] == partition)
    event = failed[0].event
    assert event["error_code"] == "UNDECODABLE"
    assert event["request_id"] is None and event["retryable"] is False
    assert event["source_topic"] == f"{peer.prefix}generation.requested.voice"
    assert failed[0].key == key.encode()
    answer = (await peer.answers_for([good["request_id"]]))[good["request_id"]]
    assert answer.kind == "completed"


async def test_missing_field_is_invalid_request_naming_it(
    engine: Engine, peer: PersonaPeer
) -> None:
    request = voice_request()
    del request["text"]
    await peer.publish("voice", request)
    answer = (await peer.answers_for([request["request_id"]]))[request["request_id"]]
    assert answer.kind == "failed"
    assert answer.event["error_code"] == "INVALID_REQUEST"
    assert "text" in answer.event["message"]
    assert answer.event["conversation_id"] == request["conversation_id"]


async def test_records_without_content_type_are_sniffed(
    engine: Engine, peer: PersonaPeer
) -> None:
    request = voice_request()
    await peer.publish("voice", request, content_type_header=False)
    answer = (await peer.answers_for([request["request_id"]]))[request["request_id"]]
    assert answer.kind == "completed"


async def test_metrics_count_consumed_completed_and_failed(
    engine: Engine, peer: PersonaPeer
) -> None:
    ok, bad = voice_request(), voice_request(text="   ")
    await peer.publish("voice", ok)
    await peer.publish("voice", bad)
    await peer.answers_for([ok["request_id"], bad["request_id"]])
    assert engine.addresses is not None
    status, body, _ = await fetch(engine.addresses.http_url + "/metrics")
    text = body.decode()
    assert status == 200
    assert 'engine_requests_consumed_total{kind="voice"} 2.0' in text
    assert 'engine_requests_completed_total{kind="voice"} 1.0' in text
    assert 'engine_requests_failed_total{error_code="INVALID_REQUEST",kind="voice"} 1.0' in text
    assert "engine_processing_seconds_bucket" in text
    assert "engine_consumer_lag_records" in text


async def test_api_key_never_appears_in_logs_events_or_health(
    settings: Any, peer: PersonaPeer, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    from prometheus_client import CollectorRegistry

    secret = "sk_test_never_print_me_42"
    keyed = settings.model_copy(update={"elevenlabs_api_key": __import__(
        "pydantic").SecretStr(secret)})
    caplog.set_level(logging.DEBUG)
    engine = Engine(keyed, keyed.kafka_bootstrap_servers, http_host="127.0.0.1",
                    registry=CollectorRegistry())
    await engine.start()
    try:
        requests = [voice_request(), voice_request(text="")]
        for r in requests:
            await peer.publish("voice", r)
        answers = await peer.answers_for([r["request_id"] for r in requests])
        assert engine.addresses is not None
        _, health, _ = await fetch(engine.addresses.http_url + "/health")
    finally:
        await engine.stop()
    assert secret not in caplog.text
    assert all(secret not in str(a.event) for a in answers.values())
    assert secret.encode() not in health


async def test_health_turns_503_when_the_broker_becomes_unreachable(
    settings: Any, tmp_path: Path
) -> None:
    from prometheus_client import CollectorRegistry

    from consumers.broker import launch_broker
    from consumers.topics import CONTRACT_TOPICS

    broker = launch_broker("tansu")  # a broker of its own, to take away
    broker.start()
    try:
        broker.create_topics([settings.topic(t) for t in CONTRACT_TOPICS], 1)
        engine = Engine(plaintext(settings), broker.bootstrap_servers, http_host="127.0.0.1",
                        registry=CollectorRegistry(), broker_watch_interval=0.2)
        await engine.start()
        try:
            assert engine.addresses is not None
            await engine.health.wait_until(lambda h: h.kafka_connected, timeout=20)
            status, body, _ = await fetch(engine.addresses.http_url + "/health")
            assert status == 200
            broker.stop()
            await engine.health.wait_until(lambda h: not h.kafka_connected, timeout=20)
            status, body, _ = await fetch(engine.addresses.http_url + "/health")
            assert status == 503
            assert b'"degraded"' in body
        finally:
            await engine.stop()
    finally:
        broker.stop()
