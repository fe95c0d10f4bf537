"""Streamed voice through the real broker: a voice request's ``generation.progress`` carries
the ``stream_url`` at its first audio; ``GET`` on it, by a listener joining mid-stream or
after the end, gives the bytes of the completed event's file; the words come on the
completed event; a cancel mid-stream ends the upstream call and the listeners' streams;
the local voice streams too."""

from __future__ import annotations

import asyncio
import io
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import soundfile
from pydantic import SecretStr

from consumers.engine import Engine
from core.settings import Settings
from tests.integration.conftest import running_engine
from tests.support.elevenlabs_server import DEFAULT_KEY, ElevenLabsServer
from tests.support.kafka_client import Answer, PersonaPeer

pytestmark = pytest.mark.kafka

TEXT = "Hello there, my friend. It is good to hear you again! Tell me about your day."


@pytest.fixture
async def paced() -> AsyncIterator[ElevenLabsServer]:
    """The local ElevenLabs streaming its first chunk after 0.2 s, then 1 KiB every 20 ms."""
    server = ElevenLabsServer(seconds_per_char=0.02, time_to_first_chunk=0.2,
                              chunk_interval=0.02, chunk_bytes=1024)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def eleven_engine(settings: Settings, paced: ElevenLabsServer) -> AsyncIterator[Engine]:
    async with running_engine(settings, voice_backend="elevenlabs",
                              elevenlabs_api_key=SecretStr(DEFAULT_KEY),
                              elevenlabs_api_url=paced.api_url,
                              voice_stream_instance="engine-a") as engine:
        yield engine


def voice_request(text: str = TEXT, **extra: Any) -> dict[str, Any]:
    return {"request_id": str(uuid.uuid4()), "conversation_id": f"conv-{uuid.uuid4().hex[:6]}",
            "text": text, "inject_emotion": False, **extra}


async def progress_of(peer: PersonaPeer, request_id: str) -> Answer:
    (answer,) = await peer.wait_for(
        lambda a: a.kind == "progress" and a.event["request_id"] == request_id)
    return answer


async def read_all(url: str) -> bytes:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        return await response.read()


def address(engine: Engine) -> str:
    assert engine.addresses is not None
    return engine.addresses.http_url


async def test_the_stream_url_plays_the_completed_file_to_early_and_late_listeners(
    eleven_engine: Engine, peer: PersonaPeer, paced: ElevenLabsServer
) -> None:
    request = voice_request(TEXT * 4)
    await peer.publish("voice", request)
    progress = await progress_of(peer, request["request_id"])
    event = progress.event
    assert (event["kind"], event["step"], event["total"]) == ("voice", 0, 1)
    assert progress.key == request["conversation_id"].encode()
    stream_url = event["stream_url"]
    assert stream_url.startswith("/streams/voice/engine-a/")  # PUBLIC_BASE_URL is empty here
    assert paced.tts_requests()[0].status is None  # upstream still streaming: mid-stream
    early = await read_all(address(eleven_engine) + stream_url)

    answer = (await peer.answers_for([request["request_id"]]))[request["request_id"]]
    assert answer.kind == "completed", answer.event
    assert answer.received_at > progress.received_at
    file = await read_all(address(eleven_engine) + answer.event["url"])
    late = await read_all(address(eleven_engine) + stream_url)  # after the end
    assert early == late == file == paced.audio_sent(TEXT * 4)
    assert len([a for a in peer.answers if a.kind == "progress"
                and a.event["request_id"] == request["request_id"]]) == 1

    words = answer.event["words"]
    assert [w["word"] for w in words][:3] == ["Hello", "there", "my"]
    assert answer.event["alignment_url"].endswith(".json")
    timings = await read_all(address(eleven_engine) + answer.event["alignment_url"])
    assert b"character_start_times_seconds" in timings


async def test_a_format_is_streamed_as_asked_and_the_late_listener_reads_the_file(
    eleven_engine: Engine, peer: PersonaPeer
) -> None:
    request = voice_request(output_format="pcm_24000")
    await peer.publish("voice", request, encoding="avro")
    progress = await progress_of(peer, request["request_id"])
    answer = (await peer.answers_for([request["request_id"]]))[request["request_id"]]
    assert answer.kind == "completed" and answer.event["filename"].endswith(".wav")
    file = await read_all(address(eleven_engine) + answer.event["url"])
    late = await read_all(address(eleven_engine) + progress.event["stream_url"])
    assert late == file  # the header's sizes are written over the stream's once complete
    info = soundfile.info(io.BytesIO(file))
    assert info.samplerate == 24000
    assert info.duration == pytest.approx(answer.event["duration_seconds"], abs=0.001)


async def test_a_cancel_mid_stream_ends_the_upstream_call_and_the_listeners(
    eleven_engine: Engine, peer: PersonaPeer, paced: ElevenLabsServer
) -> None:
    request = voice_request(TEXT * 6)
    await peer.publish("voice", request)
    progress = await progress_of(peer, request["request_id"])
    async with aiohttp.ClientSession() as session, \
            session.get(address(eleven_engine) + progress.event["stream_url"]) as listener:
        assert await listener.content.readany()
        await peer.publish("control", {"action": "cancel", "request_id": request["request_id"],
                                       "conversation_id": request["conversation_id"]})
        with pytest.raises(aiohttp.ClientPayloadError):  # cut: no final chunk
            await asyncio.wait_for(listener.read(), timeout=10)
    left = await asyncio.wait_for(paced.abandoned.get(), timeout=10)
    assert left.cut_short
    answer = (await peer.answers_for([request["request_id"]]))[request["request_id"]]
    assert answer.kind == "failed" and answer.event["error_code"] == "CANCELLED"


async def test_the_local_voice_streams_its_sentences_through_kafka(
    engine: Engine, peer: PersonaPeer
) -> None:
    request = voice_request(output_format="opus_48000_32")
    await peer.publish("voice", request)
    progress = await progress_of(peer, request["request_id"])
    listening = asyncio.ensure_future(read_all(address(engine) + progress.event["stream_url"]))
    answer = (await peer.answers_for([request["request_id"]]))[request["request_id"]]
    assert answer.kind == "completed" and answer.event["filename"].endswith(".ogg")
    file = await read_all(address(engine) + answer.event["url"])
    assert await asyncio.wait_for(listening, timeout=10) == file
    assert [w["word"] for w in answer.event["words"]] == [
        "Hello", "there", "my", "friend", "It", "is", "good", "to", "hear", "you", "again",
        "Tell", "me", "about", "your", "day"]
