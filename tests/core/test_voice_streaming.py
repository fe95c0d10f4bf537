"""Streaming voice through the core: the stream from the first chunk (late listeners get
all of it, identical to the file, for every format, in one part or several), word timings
(ElevenLabs' alignment, espeak-ng's word events, one timeline for a text in parts), every
format decoding with its duration, an unknown format refused, a failure after the first
chunk final, and a cancel mid-stream ending upstream and listeners."""

from __future__ import annotations

import asyncio
import io
import itertools
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import mutagen
import pytest
import soundfile
from pydantic import SecretStr

from core.outputs import OutputStore
from core.voice import (
    AudioStream,
    AudioStreams,
    ElevenLabsBackend,
    ElevenLabsError,
    EspeakSynthesizer,
    LocalVoiceBackend,
    StreamAborted,
    VoiceJob,
    VoiceResult,
    VoiceService,
)
from core.voice.formats import format_named, wav_header
from core.voice.streams import ListenersFull
from schemas.errors import InvalidRequestError
from schemas.events import WordTiming
from tests.support.elevenlabs_server import DEFAULT_KEY, ElevenLabsServer, Fault

RACHEL = "21m00Tcm4TlvDq8ikWAM"
TEXT = "Hello there, my friend. It is good to hear you again!"


@pytest.fixture
async def paced() -> AsyncIterator[ElevenLabsServer]:
    s = ElevenLabsServer(seconds_per_char=0.02, time_to_first_chunk=0.05, chunk_interval=0.01,
                         chunk_bytes=1024)
    await s.start()
    yield s
    await s.stop()


def service_for(backend: ElevenLabsBackend | LocalVoiceBackend, store: OutputStore,
                tmp_path: Path) -> VoiceService:
    streams = AudioStreams(tmp_path / "streams", "http://engine-1:8000", "engine-1", linger=30)
    return VoiceService(backend, store, RACHEL, streams=streams)


def elevenlabs(http: httpx.AsyncClient, server: ElevenLabsServer) -> ElevenLabsBackend:
    return ElevenLabsBackend(http, server.api_url, SecretStr(DEFAULT_KEY),
                             timeout=httpx.Timeout(5.0))


async def drain(stream: AudioStream) -> bytes:
    return b"".join([block async for block in stream.read()])


async def test_a_late_listener_gets_the_whole_stream_identical_to_the_file(
    paced: ElevenLabsServer, http: httpx.AsyncClient, store: OutputStore, tmp_path: Path
) -> None:
    service = service_for(elevenlabs(http, paced), store, tmp_path)
    announced: list[tuple[AudioStream, str]] = []
    early: list[asyncio.Task[bytes]] = []

    async def on_stream(stream: AudioStream, url: str) -> None:
        announced.append((stream, url))
        early.append(asyncio.ensure_future(drain(stream)))

    result = await service.generate(VoiceJob(TEXT, inject_emotion=False), on_stream=on_stream)
    (stream, url), = announced
    assert url == f"http://engine-1:8000/streams/voice/engine-1/{stream.id}"
    late = await drain(stream)  # joins after the end, within the linger
    path = store.resolve(result.filename)
    assert path is not None
    assert late == await early[0] == path.read_bytes() == paced.audio_sent(TEXT)


async def test_words_cover_the_callers_text_in_order_and_match_the_servers_alignment(
    server: ElevenLabsServer, http: httpx.AsyncClient, store: OutputStore, tmp_path: Path
) -> None:
    service = service_for(elevenlabs(http, server), store, tmp_path)
    result = await service.generate(VoiceJob(TEXT, inject_emotion=False))
    assert result.words is not None and result.alignment_url is not None
    assert [w.word for w in result.words] == ["Hello", "there", "my", "friend", "It", "is",
                                              "good", "to", "hear", "you", "again"]
    assert all(TEXT[w.char_start:w.char_end] == w.word for w in result.words)
    starts = [w.start for w in result.words]
    assert starts == sorted(starts) and all(w.end >= w.start for w in result.words)
    aligned = server.alignment(TEXT)
    for w in result.words:
        assert w.start == pytest.approx(aligned["character_start_times_seconds"][w.char_start])
        assert w.end == pytest.approx(aligned["character_end_times_seconds"][w.char_end - 1])


@pytest.mark.parametrize(("fmt", "suffix", "rate"), [
    ("mp3_22050_32", "mp3", 22050), ("opus_48000_64", "ogg", 48000),
    ("pcm_24000", "wav", 24000), ("ulaw_8000", "wav", 8000), ("alaw_8000", "wav", 8000),
])
async def test_each_format_decodes_with_its_duration_from_elevenlabs_and_locally(
    server: ElevenLabsServer, http: httpx.AsyncClient, store: OutputStore, tmp_path: Path,
    fmt: str, suffix: str, rate: int
) -> None:
    for backend in (elevenlabs(http, server), LocalVoiceBackend(EspeakSynthesizer())):
        service = service_for(backend, store, tmp_path)
        result = await service.generate(VoiceJob(TEXT, inject_emotion=False,
                                                 output_format=fmt))
        assert result.filename.endswith(f".{suffix}") and result.output_format == fmt
        path = store.resolve(result.filename)
        assert path is not None
        info = soundfile.info(io.BytesIO(path.read_bytes()))
        assert info.samplerate == rate
        assert result.duration_seconds == pytest.approx(info.duration, abs=0.001)
        assert result.words is not None and len(result.words) == 11


async def test_an_unknown_format_is_refused_naming_the_field(
    server: ElevenLabsServer, http: httpx.AsyncClient, store: OutputStore, tmp_path: Path
) -> None:
    service = service_for(elevenlabs(http, server), store, tmp_path)
    with pytest.raises(InvalidRequestError) as caught:
        await service.generate(VoiceJob(TEXT, output_format="wav_44100"))
    assert caught.value.field == "output_format" and server.tts_calls == 0


async def test_a_cancel_mid_stream_ends_the_upstream_call_and_the_listeners(
    paced: ElevenLabsServer, http: httpx.AsyncClient, store: OutputStore, tmp_path: Path
) -> None:
    paced.chunk_interval = 0.2
    service = service_for(elevenlabs(http, paced), store, tmp_path)
    listening: asyncio.Queue[asyncio.Task[bytes]] = asyncio.Queue()

    async def on_stream(stream: AudioStream, url: str) -> None:
        listening.put_nowait(asyncio.ensure_future(drain(stream)))

    work = asyncio.ensure_future(service.generate(VoiceJob(TEXT * 3, inject_emotion=False),
                                                  on_stream=on_stream))
    listener = await asyncio.wait_for(listening.get(), timeout=5)
    work.cancel()
    with pytest.raises(asyncio.CancelledError):
        await work
    with pytest.raises(StreamAborted):
        await asyncio.wait_for(listener, timeout=5)
    left = await asyncio.wait_for(paced.abandoned.get(), timeout=5)
    assert left.cut_short
    assert [n for n in store.directory.iterdir() if n.is_file()] == []


# --- the stream is the file, whatever the format and the parts ---

LONG = " ".join(f"This is sentence number {i} of a long story, told slowly and with care."
                for i in range(100))  # ~7,300 characters: parts of at most 3,000 (eleven_v3)
_MP3_KBPS = {3: (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
             2: (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160)}
_MP3_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000)}


def header_length(data: bytes, fmt: str) -> int:
    """The bytes at the start of a stream that may differ from the file's (the header
    that needs the end): a WAV header, or the header frame of a joined MP3."""
    if format_named(fmt).raw:
        return len(wav_header(format_named(fmt), 0))
    version = (data[1] >> 3) & 3
    kbps = _MP3_KBPS[version][data[2] >> 4]
    rate = _MP3_RATES[version][(data[2] >> 2) & 3]
    return (144_000 if version == 3 else 72_000) * kbps // rate + ((data[2] >> 1) & 1)


def assert_words_cover(text: str, words: list[WordTiming] | None, duration: float) -> None:
    """Every word of ``text`` in order, at its position, on one monotonic timeline within
    the audio."""
    assert words is not None
    assert [w.word for w in words] == re.findall(r"\w+(?:['’\-]\w+)*", text)
    assert all(text[w.char_start:w.char_end] == w.word for w in words)
    starts = [w.start for w in words]
    assert starts == sorted(starts) and all(w.end >= w.start for w in words)
    assert 0 <= words[0].start and words[-1].end <= duration + 0.002


async def stream_and_file(service: VoiceService, store: OutputStore, job: VoiceJob
                          ) -> tuple[bytes, bytes, bytes, VoiceResult]:
    """What a listener from the first audio read, what one after the end read, the file,
    and the result."""
    announced: list[AudioStream] = []
    early: list[asyncio.Task[bytes]] = []

    async def on_stream(stream: AudioStream, url: str) -> None:
        announced.append(stream)
        early.append(asyncio.ensure_future(drain(stream)))

    result = await service.generate(job, on_stream=on_stream)
    late = await drain(announced[0])
    path = store.resolve(result.filename)
    assert path is not None
    return await early[0], late, path.read_bytes(), result


@pytest.mark.parametrize("fmt", ["mp3_44100_128", "opus_48000_64", "pcm_24000", "ulaw_8000"])
@pytest.mark.parametrize("speaker", ["elevenlabs-v3", "elevenlabs-stitched", "local"])
async def test_a_text_in_parts_streams_the_bytes_of_its_file(
    server: ElevenLabsServer, http: httpx.AsyncClient, store: OutputStore, tmp_path: Path,
    fmt: str, speaker: str
) -> None:
    server.seconds_per_char = 0.0003
    if speaker == "elevenlabs-v3":  # parts requested concurrently, with text context
        service = service_for(elevenlabs(http, server), store, tmp_path)
        job = VoiceJob(LONG, inject_emotion=False, model_id="eleven_v3", output_format=fmt)
    elif speaker == "elevenlabs-stitched":  # one after the other, by request-id
        service = service_for(elevenlabs(http, server), store, tmp_path)
        job = VoiceJob(LONG + " " + LONG[:4000], inject_emotion=False, output_format=fmt,
                       model_id="eleven_multilingual_v2")  # over its 10,000 characters
    else:  # one part per sentence
        service = service_for(LocalVoiceBackend(EspeakSynthesizer()), store, tmp_path)
        job = VoiceJob(TEXT + " How was your day? Tell me everything.", inject_emotion=False,
                       output_format=fmt)
    early, late, file, result = await stream_and_file(service, store, job)
    sent = server.tts_requests()
    if speaker == "elevenlabs-stitched":
        assert len(sent) == 2 and sent[1].json["previous_request_ids"] == [sent[0].request_id]
    elif speaker == "elevenlabs-v3":
        assert len(sent) > 2

    assert late == file  # a listener who starts after the end reads the file exactly
    assert len(early) == len(file)  # one from the start: the same, but for the header
    differs = [i for i, (a, b) in enumerate(zip(early, file, strict=True)) if a != b]
    if fmt.startswith("opus"):
        assert differs == []
    else:
        assert differs and max(differs) < header_length(early, fmt)
    info = soundfile.info(io.BytesIO(file))
    assert info.samplerate == format_named(fmt).sample_rate
    assert result.duration_seconds == pytest.approx(info.duration, abs=0.001)
    decoded, rate = soundfile.read(io.BytesIO(file))
    assert len(decoded) / rate == pytest.approx(info.duration, abs=0.001)
    if not format_named(fmt).raw:  # an independent reader agrees
        reader: Any = mutagen.File(io.BytesIO(file))
        assert reader.info.length == pytest.approx(info.duration, abs=0.001)
    assert_words_cover(job.text, result.words, result.duration_seconds)


async def test_a_stitched_texts_words_are_one_timeline_matching_each_parts_alignment(
    server: ElevenLabsServer, http: httpx.AsyncClient, store: OutputStore, tmp_path: Path
) -> None:
    server.seconds_per_char = 0.0005
    service = service_for(elevenlabs(http, server), store, tmp_path)
    pcm = "pcm_16000"  # raw: each part starts exactly where the one before it ends
    result = await service.generate(VoiceJob(LONG, inject_emotion=False,
                                             model_id="eleven_v3", output_format=pcm))
    assert_words_cover(LONG, result.words, result.duration_seconds)
    assert result.words is not None
    offset = 0.0
    position = 0
    for sent in server.tts_requests():
        part = sent.json["text"]
        position = LONG.index(part, position)
        aligned = server.alignment(part)
        inside = [w for w in result.words if position <= w.char_start < position + len(part)]
        assert inside
        for w in inside:
            first, last = w.char_start - position, w.char_end - 1 - position
            assert w.start == pytest.approx(
                offset + aligned["character_start_times_seconds"][first], abs=1e-3)
            assert w.end == pytest.approx(
                offset + aligned["character_end_times_seconds"][last], abs=1e-3)
        offset += len(server.audio_sent(part, pcm)) / 2 / 16000
        position += len(part)
    assert offset == pytest.approx(result.duration_seconds, abs=1e-3)


async def test_the_local_voice_streams_sentence_by_sentence(
    store: OutputStore, tmp_path: Path
) -> None:
    service = service_for(LocalVoiceBackend(EspeakSynthesizer()), store, tmp_path)
    text = "Hello there, my friend. It is good to hear you again! How was your day?"
    at_announce: list[int] = []

    async def on_stream(stream: AudioStream, url: str) -> None:
        at_announce.append(stream.size)

    result = await service.generate(VoiceJob(text, inject_emotion=False,
                                             output_format="pcm_24000"), on_stream=on_stream)
    first = (at_announce[0] - len(wav_header(format_named("pcm_24000"), 0))) / 2 / 24000
    assert 0 < first < result.duration_seconds / 2  # the first sentence, not the text
    assert result.words is not None
    sentence_one = [w for w in result.words if w.char_start < text.index("It")]
    later = [w for w in result.words if w.char_start >= text.index("It")]
    assert sentence_one[-1].end == pytest.approx(first, abs=1e-3)
    assert later[0].start >= first - 1e-3


async def test_espeak_word_timings_are_monotonic_and_cover_every_word(
    store: OutputStore, tmp_path: Path
) -> None:
    service = service_for(LocalVoiceBackend(EspeakSynthesizer()), store, tmp_path)
    text = ("Well-known facts aside, I don't think it's raining! Do you? "
            "[laughs] Let's walk to the park, 42 steps or so.")
    result = await service.generate(VoiceJob(text, inject_emotion=False))
    plain = text.replace("[laughs] ", "")
    assert result.words is not None and "laughs" not in [w.word for w in result.words]
    assert [w.word for w in result.words] == re.findall(r"\w+(?:['’\-]\w+)*", plain)
    assert all(text[w.char_start:w.char_end] == w.word for w in result.words)
    starts = [w.start for w in result.words]
    assert all(b > a for a, b in itertools.pairwise(starts))  # espeak: one event per word
    assert all(w.end > w.start for w in result.words)
    assert result.words[-1].end <= result.duration_seconds + 0.002
    assert result.alignment_url is not None and result.alignment_url.endswith(".json")


async def test_a_failure_after_the_first_chunk_is_final_and_leaves_no_file(
    paced: ElevenLabsServer, http: httpx.AsyncClient, store: OutputStore, tmp_path: Path
) -> None:
    service = service_for(elevenlabs(http, paced), store, tmp_path)
    paced.faults = [Fault("drop")]  # half the chunks, then the connection closes
    listening: list[asyncio.Task[bytes]] = []

    async def on_stream(stream: AudioStream, url: str) -> None:
        listening.append(asyncio.ensure_future(drain(stream)))

    with pytest.raises(ElevenLabsError) as caught:
        await service.generate(VoiceJob(TEXT * 3, inject_emotion=False), on_stream=on_stream)
    assert caught.value.code == "UPSTREAM_UNAVAILABLE" and caught.value.retryable is False
    assert "after audio was streamed" in caught.value.message
    assert len(paced.tts_requests()) == 1  # not asked again: listeners heard the start
    with pytest.raises(StreamAborted):
        await asyncio.wait_for(listening[0], timeout=5)
    assert [n for n in store.directory.iterdir() if n.is_file()] == []


async def test_without_listeners_a_dropped_stream_is_asked_again(
    paced: ElevenLabsServer, http: httpx.AsyncClient, store: OutputStore, tmp_path: Path
) -> None:
    service = service_for(elevenlabs(http, paced), store, tmp_path)
    paced.faults = [Fault("drop")]
    result = await service.generate(VoiceJob(TEXT, inject_emotion=False))
    assert [r.fault for r in paced.tts_requests()] == ["drop", None]
    path = store.resolve(result.filename)
    assert path is not None and path.read_bytes() == paced.audio_sent(TEXT)


async def test_an_instance_starting_on_a_shared_folder_leaves_the_others_streams(
    tmp_path: Path
) -> None:
    shared = tmp_path / "streams"  # OUTPUT_DIR/.voice-streams, shared by a fleet
    one = AudioStreams(shared, "http://engine-1:8000", "engine-1")
    stream = one.open("audio/mpeg")
    await stream.write(b"live audio")
    stream.finish()
    AudioStreams(shared, "http://engine-2:8000", "engine-2")  # another instance starts
    assert await drain(stream) == b"live audio"
    AudioStreams(shared, "http://engine-1:8000", "engine-1")  # engine-1 itself restarts
    assert list((shared / "engine-1").glob("*.part")) == []


async def test_a_stream_takes_its_listeners_and_another_once_one_has_left(
    tmp_path: Path
) -> None:
    streams = AudioStreams(tmp_path / "streams", "http://engine-1:8000", "engine-1",
                           max_listeners=2)
    stream = streams.open("audio/mpeg")
    first, second = stream.join(), stream.join()
    with pytest.raises(ListenersFull, match="has its 2 listeners already"):
        stream.join()
    with second:
        assert stream.listeners == 2
    second.leave()  # leaving twice leaves once
    assert stream.listeners == 1
    with stream.join():
        assert stream.listeners == 2
    first.leave()
    assert stream.listeners == 0
    stream.discard()


@pytest.mark.parametrize(("limits", "message"), [
    ({"max_listeners": 0}, "max_listeners must be >= 1, got 0"),
    ({"write_timeout": 0.0}, "write_timeout must be > 0 seconds, got 0.0"),
])
def test_listener_limits_out_of_range_are_refused_naming_them(
    tmp_path: Path, limits: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        AudioStreams(tmp_path / "streams", "http://engine-1:8000", "engine-1", **limits)
