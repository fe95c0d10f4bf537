"""Retries and finality while a request streams: a later part that failed before any of its
audio went out is asked again (its held bytes dropped) and the stream is the file; a part
whose audio went out is not; the announce (the progress publish) runs beside the upstream
read, precedes the end, and a failed one leaves the request retryable (nobody had the
URL)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from core.outputs import OutputStore
from core.voice import AudioStream, AudioStreams, ElevenLabsBackend, VoiceJob, VoiceService
from core.voice.assembly import PartsStream
from core.voice.formats import format_named
from schemas.errors import UpstreamUnavailableError
from tests.support.elevenlabs_server import DEFAULT_KEY, ElevenLabsServer, Fault, RecordingSleep

RACHEL = "21m00Tcm4TlvDq8ikWAM"
TEXT = "Hello there, my friend. It is good to hear you again!"
LONG = " ".join(f"This is sentence number {i} of a long story, told slowly and with care."
                for i in range(100))
STITCHED = LONG + " " + LONG[:4000]  # ~11,300 characters: two parts on multilingual_v2


def service_for(http: httpx.AsyncClient, server: ElevenLabsServer, store: OutputStore,
                tmp_path: Path) -> VoiceService:
    backend = ElevenLabsBackend(http, server.api_url, SecretStr(DEFAULT_KEY),
                                timeout=httpx.Timeout(5.0), sleep=RecordingSleep())
    streams = AudioStreams(tmp_path / "streams", "http://engine-1:8000", "engine-1", linger=30)
    return VoiceService(backend, store, RACHEL, streams=streams)


async def drain(stream: AudioStream) -> bytes:
    return b"".join([block async for block in stream.read()])


async def test_a_later_part_refused_after_the_first_streamed_is_asked_again(
    server: ElevenLabsServer, http: httpx.AsyncClient, store: OutputStore, tmp_path: Path
) -> None:
    server.seconds_per_char = 0.0003
    server.faults = [None, Fault("too_many_concurrent_requests")]  # part 1, before a byte
    service = service_for(http, server, store, tmp_path)
    listening: list[asyncio.Task[bytes]] = []

    async def on_stream(stream: AudioStream, url: str) -> None:
        listening.append(asyncio.ensure_future(drain(stream)))

    result = await service.generate(
        VoiceJob(STITCHED, inject_emotion=False, model_id="eleven_multilingual_v2",
                 output_format="opus_48000_64"),  # joined Opus: nothing written over
        on_stream=on_stream)
    sent = server.tts_requests()
    assert [r.fault for r in sent] == [None, "too_many_concurrent_requests", None]
    assert sent[2].json["text"] == sent[1].json["text"]
    path = store.resolve(result.filename)
    assert path is not None
    assert await asyncio.wait_for(listening[0], timeout=5) == path.read_bytes()


async def test_a_part_whose_audio_went_out_is_not_asked_again_but_held_bytes_are_dropped(
    tmp_path: Path
) -> None:
    class Sink:
        def __init__(self) -> None:
            self.data = bytearray()

        async def write(self, data: bytes) -> None:
            self.data += data

        async def rewrite(self, offset: int, data: bytes) -> None:
            self.data[offset:offset + len(data)] = data

    sink = Sink()
    live = PartsStream(tmp_path / "out.wav", sink, format_named("pcm_16000"), 3)
    try:
        await live.write(1, b"\x01\x01" * 10)  # held behind part 0
        assert not live.heard(1)
        live.restart(1)  # part 1 asked again: what it held is gone
        await live.write(1, b"\x02\x02" * 4)
        await live.write(0, b"\x00\x00" * 4)
        assert live.heard(0) and not live.heard(1)
        await live.done(0)  # part 1's new bytes go out now
        assert live.heard(1) and not live.heard(2)
        await live.done(1)
        await live.write(2, b"\x03\x03" * 4)
        await live.done(2)
        await live.finish()
    finally:
        live.close()
    body = (tmp_path / "out.wav").read_bytes()[44:]
    assert body == b"\x00\x00" * 4 + b"\x02\x02" * 4 + b"\x03\x03" * 4
    assert bytes(sink.data) == (tmp_path / "out.wav").read_bytes()


async def test_the_upstream_read_goes_on_while_the_announce_runs_and_it_ends_first(
    server: ElevenLabsServer, http: httpx.AsyncClient, store: OutputStore, tmp_path: Path
) -> None:
    server.chunk_bytes = 256  # the audio in several chunks
    service = service_for(http, server, store, tmp_path)
    await service.generate(VoiceJob(TEXT, inject_emotion=False))
    whole = len(server.audio_sent(TEXT))  # the same bytes again (no seed: not remembered)
    assert whole > 4 * 256
    seen: list[int] = []

    async def on_stream(stream: AudioStream, url: str) -> None:
        # a publish that takes until the whole audio arrived: it must not hold up the read
        received = 0
        async for block in stream.read():
            received += len(block)
            if received >= whole:
                break
        seen.append(received)

    result = await asyncio.wait_for(
        service.generate(VoiceJob(TEXT, inject_emotion=False), on_stream=on_stream),
        timeout=5)
    assert seen == [whole]  # announced, and before generate returned
    path = store.resolve(result.filename)
    assert path is not None and path.stat().st_size == whole


async def test_a_failed_announce_leaves_the_request_retryable_and_no_file(
    server: ElevenLabsServer, http: httpx.AsyncClient, store: OutputStore, tmp_path: Path
) -> None:
    service = service_for(http, server, store, tmp_path)

    async def on_stream(stream: AudioStream, url: str) -> None:
        raise UpstreamUnavailableError("progress not published: broker unavailable")

    with pytest.raises(UpstreamUnavailableError) as caught:
        await service.generate(VoiceJob(TEXT, inject_emotion=False), on_stream=on_stream)
    assert caught.value.retryable is True  # nobody had the URL: a retry repeats nothing
    assert "after audio was streamed" not in caught.value.message
    assert [n for n in store.directory.iterdir() if n.is_file()] == []


async def test_a_failure_after_a_successful_announce_is_final(
    server: ElevenLabsServer, http: httpx.AsyncClient, store: OutputStore, tmp_path: Path
) -> None:
    server.seconds_per_char = 0.0003
    server.faults = [None, Fault("drop")]  # part 1 cut off after some of its audio went out
    service = service_for(http, server, store, tmp_path)
    announced: list[str] = []

    async def on_stream(stream: AudioStream, url: str) -> None:
        announced.append(url)

    with pytest.raises(UpstreamUnavailableError) as caught:
        await service.generate(VoiceJob(STITCHED, inject_emotion=False,
                                         model_id="eleven_multilingual_v2"),
                               on_stream=on_stream)
    assert announced and caught.value.retryable is False
    assert len(server.tts_requests()) == 2  # part 1's start was heard: not asked again
