"""The voice completed event and the broker's message limit: a long text's event leaves
``words`` out (the timings stay at ``alignment_url``, and a log line says so) and stays
well under Kafka's default 1 MB in both encodings, where with its words it would not have
fitted; a short text's event carries every word."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from consumers.handlers.voice import MAX_EVENT_BYTES_WITH_WORDS, VoiceHandler
from consumers.routes import HandlerContext
from core.outputs import OutputStore
from core.voice import Alignment, ElevenLabsBackend, VoiceService, word_timings
from schemas.codec import EventCodec
from schemas.events import GenerationCompleted, VoiceRequested
from tests.support.elevenlabs_server import DEFAULT_KEY, ElevenLabsServer

RACHEL = "21m00Tcm4TlvDq8ikWAM"
KAFKA_DEFAULT_MAX_BYTES = 1_048_588  # message.max.bytes


@pytest.fixture
async def upstream() -> AsyncIterator[ElevenLabsServer]:
    server = ElevenLabsServer(seconds_per_char=0.0005)  # short audio: 20 s for 40,000 chars
    await server.start()
    yield server
    await server.stop()


async def complete(upstream: ElevenLabsServer, store: OutputStore, text: str
                   ) -> GenerationCompleted:
    async with httpx.AsyncClient() as http:
        backend = ElevenLabsBackend(http, upstream.api_url, SecretStr(DEFAULT_KEY),
                                    timeout=httpx.Timeout(30.0))
        handler = VoiceHandler(VoiceService(backend, store, RACHEL))
        request = VoiceRequested(request_id="r-1", conversation_id="c-1", text=text,
                                 inject_emotion=False, output_format="pcm_16000")
        return await handler(request, HandlerContext())


async def test_a_long_texts_event_leaves_its_words_to_the_timings_file(
    upstream: ElevenLabsServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = OutputStore(tmp_path / "outputs")
    text = "I am a cat. " * 3_400  # 40,800 characters, 13,600 words
    with caplog.at_level(logging.INFO, logger="consumers.handlers.voice"):
        completed = await complete(upstream, store, text)

    assert completed.words is None and completed.alignment_url is not None
    codec = EventCodec()
    for encoding in ("json", "avro"):
        assert len(codec.encode(completed, encoding)) < MAX_EVENT_BYTES_WITH_WORDS

    timings = store.resolve(completed.alignment_url.rsplit("/", 1)[-1])
    assert timings is not None  # every word's timing is there, for whoever needs them
    raw = json.loads(timings.read_text())
    words = word_timings(text, Alignment.of_characters(
        raw["text"], raw["characters"], raw["character_start_times_seconds"],
        raw["character_end_times_seconds"]))
    assert len(words) == 13_600
    whole = completed.model_copy(update={"words": words})
    assert len(codec.encode(whole, "json")) > KAFKA_DEFAULT_MAX_BYTES  # would not publish

    (said,) = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert "request_id=r-1" in said and "13600 words" in said
    assert completed.alignment_url in said


async def test_a_short_texts_event_carries_every_word(
    upstream: ElevenLabsServer, tmp_path: Path
) -> None:
    text = "Hello there, my friend. It is good to hear you again! " * 40
    completed = await complete(upstream, OutputStore(tmp_path / "outputs"), text)
    assert completed.words is not None and len(completed.words) == 11 * 40
    assert [w.word for w in completed.words[:3]] == ["Hello", "there", "my"]
    assert completed.alignment_url is not None
