"""The local ElevenLabs' streaming and timestamp paths, as the API description defines them:
paced chunks after a time to first chunk, JSON lines with character alignment, every
output format, and a client that goes away."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import soundfile

from tests.support.elevenlabs_server import DEFAULT_KEY, ElevenLabsServer

RACHEL = "21m00Tcm4TlvDq8ikWAM"
TEXT = "Hello there, how are you?"
HEADERS = {"xi-api-key": DEFAULT_KEY}


@pytest.fixture
async def paced() -> AsyncIterator[ElevenLabsServer]:
    s = ElevenLabsServer(seconds_per_char=0.02, time_to_first_chunk=0.2, chunk_interval=0.02,
                         chunk_bytes=1024)
    await s.start()
    yield s
    await s.stop()


def url(server: ElevenLabsServer, path: str, fmt: str = "mp3_44100_128") -> str:
    return f"{server.api_url}/text-to-speech/{RACHEL}{path}?output_format={fmt}"


async def test_stream_sends_its_first_chunk_after_the_set_time_then_paced_chunks(
    paced: ElevenLabsServer, http: httpx.AsyncClient
) -> None:
    started = time.monotonic()
    arrivals: list[float] = []
    body = b""
    async with http.stream("POST", url(paced, "/stream"), json={"text": TEXT},
                           headers=HEADERS) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "audio/mpeg"
        async for chunk in response.aiter_raw():
            arrivals.append(time.monotonic() - started)
            body += chunk
    assert body == paced.audio_sent(TEXT)
    assert 0.2 <= arrivals[0] < 0.35
    assert len(arrivals) > 2 and arrivals[-1] - arrivals[0] >= 0.02 * (len(body) // 1024 - 1)


async def test_with_timestamps_answers_the_audio_and_every_characters_timing(
    server: ElevenLabsServer, http: httpx.AsyncClient
) -> None:
    response = await http.post(url(server, "/with-timestamps"), json={"text": TEXT},
                               headers=HEADERS)
    assert response.status_code == 200
    answer = response.json()
    assert base64.b64decode(answer["audio_base64"]) == server.audio_sent(TEXT)
    alignment = answer["alignment"]
    assert "".join(alignment["characters"]) == TEXT
    starts = alignment["character_start_times_seconds"]
    ends = alignment["character_end_times_seconds"]
    assert starts == sorted(starts) and all(s < e for s, e in zip(starts, ends, strict=True))
    assert ends[-1] == pytest.approx(server.audio_seconds(TEXT))
    assert "".join(answer["normalized_alignment"]["characters"]) == TEXT


async def test_stream_with_timestamps_is_json_lines_whose_parts_add_up(
    paced: ElevenLabsServer, http: httpx.AsyncClient
) -> None:
    lines: list[dict[str, Any]] = []
    async with http.stream("POST", url(paced, "/stream/with-timestamps"),
                           json={"text": TEXT}, headers=HEADERS) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.strip():
                lines.append(json.loads(line))
    assert len(lines) > 1
    audio = b"".join(base64.b64decode(line["audio_base64"]) for line in lines)
    assert audio == paced.audio_sent(TEXT)
    characters = [c for line in lines if line["alignment"]
                  for c in line["alignment"]["characters"]]
    starts = [t for line in lines if line["alignment"]
              for t in line["alignment"]["character_start_times_seconds"]]
    assert "".join(characters) == TEXT
    assert starts == paced.alignment(TEXT)["character_start_times_seconds"]


@pytest.mark.parametrize(("fmt", "rate"), [
    ("mp3_22050_32", 22050), ("mp3_44100_192", 44100), ("opus_48000_64", 48000),
])
async def test_each_container_format_decodes_at_its_rate_and_length(
    server: ElevenLabsServer, http: httpx.AsyncClient, fmt: str, rate: int
) -> None:
    response = await http.post(url(server, "", fmt), json={"text": TEXT}, headers=HEADERS)
    assert response.status_code == 200
    info = soundfile.info(io.BytesIO(response.content))
    assert info.samplerate == rate
    assert info.duration == pytest.approx(server.audio_seconds(TEXT), abs=0.03)


@pytest.mark.parametrize(("fmt", "bytes_per_second"), [
    ("pcm_24000", 48000), ("pcm_16000", 32000), ("ulaw_8000", 8000), ("alaw_8000", 8000),
])
async def test_raw_formats_come_without_a_header(
    server: ElevenLabsServer, http: httpx.AsyncClient, fmt: str, bytes_per_second: int
) -> None:
    response = await http.post(url(server, "/stream", fmt), json={"text": TEXT},
                               headers=HEADERS)
    assert response.status_code == 200
    assert not response.content.startswith(b"RIFF")
    assert len(response.content) == round(server.audio_seconds(TEXT) * bytes_per_second)


async def test_an_unknown_format_is_refused_naming_the_query_field(
    server: ElevenLabsServer, http: httpx.AsyncClient
) -> None:
    response = await http.post(url(server, "/stream", "wav_44100"), json={"text": TEXT},
                               headers=HEADERS)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["query", "output_format"]


async def test_a_client_leaving_mid_stream_is_seen_by_the_server(
    paced: ElevenLabsServer, http: httpx.AsyncClient
) -> None:
    long_text = TEXT * 8
    async with http.stream("POST", url(paced, "/stream"), json={"text": long_text},
                           headers=HEADERS) as response:
        async for _ in response.aiter_raw():
            break  # one chunk, then leave
    left = await asyncio.wait_for(paced.abandoned.get(), timeout=5)
    assert left.cut_short and 0 < left.chunks_sent < len(paced.audio_sent(long_text)) // 1024
