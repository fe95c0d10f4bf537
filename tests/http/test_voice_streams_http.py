"""Streamed voice over HTTP, on a real server on 127.0.0.1 against the local ElevenLabs:
``POST /generate/voice`` with ``Accept: audio/*`` answers with the audio from its first
chunk; ``GET`` on the stream's URL gives any listener, early or late, the whole stream from
its start, the bytes of the file; a failure after the first chunk cuts the answer short; a
replay answered from the remembered results is its file; a stream not here is a 404; a
stream takes its listeners and one more once one has left (finished or gone), and a
listener that stops reading is reset after the write timeout, its place freed; a HEAD
answers the headers alone, taking no place."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.typedefs import Handler
from prometheus_client import CollectorRegistry
from pydantic import SecretStr
from yarl import URL

from core.health import EngineHealth
from core.metrics import EngineMetrics
from core.outputs import OutputStore
from core.remembered import RememberedResults
from core.scheduling import build_scheduling
from core.settings import load_settings
from core.storage import SharedOutputs, build_object_store
from core.voice import (
    AudioStream,
    AudioStreams,
    ElevenLabsBackend,
    EspeakSynthesizer,
    LocalVoiceBackend,
    VoiceResults,
    VoiceService,
)
from http_files import AppServices, create_app
from http_files.uploads import UploadLimits
from schemas.codec import EventCodec
from tests.http.raw import more_than_a_socket_holds, open_raw, read_response
from tests.support.elevenlabs_server import DEFAULT_KEY, ElevenLabsServer, Fault
from tests.support.s3_server import StoreLocation

TEXT = "Hello there, my friend. It is good to hear you again! Tell me about your day."
AUDIO = {"Accept": "audio/mpeg"}


@dataclass
class Streaming:
    """``client`` checks every exchange against docs/openapi.json, reading each body whole
    first; ``session`` is a plain client, for what happens while a body arrives."""

    client: TestClient
    session: aiohttp.ClientSession
    upstream: ElevenLabsServer
    store: OutputStore

    def url(self, path: str) -> str:
        return str(self.client.make_url(path))

    def files(self, suffix: str = ".mp3") -> list[Path]:
        return [p for p in self.store.directory.iterdir() if p.name.endswith(suffix)]


@pytest.fixture
async def streaming(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                    ) -> AsyncIterator[Streaming]:
    """The app over an ElevenLabs voice that streams (first chunk after 0.2 s, then a
    1 KiB chunk every 20 ms), its stream URLs naming the app's own address."""
    monkeypatch.chdir(tmp_path)
    upstream = ElevenLabsServer(seconds_per_char=0.02, time_to_first_chunk=0.2,
                                chunk_interval=0.02, chunk_bytes=1024)
    await upstream.start()
    store = OutputStore(tmp_path / "outputs", cleanup_delay=3600)
    metrics = EngineMetrics(CollectorRegistry())
    local = VoiceService(LocalVoiceBackend(EspeakSynthesizer()), store, "21m00Tcm4TlvDq8ikWAM")
    services = AppServices(health=EngineHealth(voice_backend="elevenlabs"), metrics=metrics,
                           store=store, codec=EventCodec(), voice=local,
                           scheduling=build_scheduling(load_settings(), metrics))
    app = create_app(services, UploadLimits(tmp_path / "temp" / "uploads"))
    async with httpx.AsyncClient() as http, aiohttp.ClientSession() as session, \
            TestClient(TestServer(app, host="127.0.0.1")) as client:
        backend = ElevenLabsBackend(http, upstream.api_url, SecretStr(DEFAULT_KEY),
                                    timeout=httpx.Timeout(5.0))
        streams = AudioStreams(tmp_path / "streams", str(client.make_url("")), "engine-1",
                               linger=30)
        results = VoiceResults(RememberedResults(tmp_path / "results"))
        services.voice = VoiceService(backend, store, "21m00Tcm4TlvDq8ikWAM", streams=streams,
                                      results=results)
        try:
            yield Streaming(client, session, upstream, store)
        finally:
            await upstream.stop()


def path_of(url: str) -> str:
    return URL(url).path


async def test_accept_audio_answers_with_the_stream_from_its_first_chunk(
    streaming: Streaming,
) -> None:
    started = time.monotonic()
    response = await streaming.session.post(streaming.url("/generate/voice"),
                                            json={"text": TEXT * 3}, headers=AUDIO)
    assert response.status == 200
    assert response.headers["Content-Type"] == "audio/mpeg"
    assert response.headers["Transfer-Encoding"] == "chunked"
    assert response.headers["X-Request-Id"]
    first = await response.content.readany()
    first_at = time.monotonic() - started
    body = first + await response.read()
    done_at = time.monotonic() - started
    chunks = -(-len(body) // 1024)  # upstream paces them 20 ms apart
    assert chunks > 10 and 0.2 <= first_at  # upstream's time to first chunk
    assert done_at - first_at >= 0.5 * 0.02 * (chunks - 1)  # heard long before the end

    (file,) = streaming.files()
    assert body == file.read_bytes() == streaming.upstream.audio_sent(TEXT * 3)
    stream_url = response.headers["X-Stream-Url"]
    assert stream_url.startswith(str(streaming.client.make_url("/streams/voice/engine-1/")))
    late = await streaming.client.get(path_of(stream_url))  # after the end, in the linger
    assert late.status == 200 and await late.read() == body


async def test_a_listener_joining_mid_stream_gets_it_all_from_the_start(
    streaming: Streaming,
) -> None:
    response = await streaming.session.post(streaming.url("/generate/voice"),
                                            json={"text": TEXT * 4}, headers=AUDIO)
    first = await response.content.readany()
    joined = await streaming.session.get(response.headers["X-Stream-Url"])
    assert joined.status == 200 and joined.headers["Content-Type"] == "audio/mpeg"
    assert streaming.upstream.tts_requests()[0].status is None  # upstream still streaming
    heard = await joined.read()
    told = first + await response.read()
    (file,) = streaming.files()
    assert heard == told == file.read_bytes()


async def test_a_failure_after_the_first_chunk_cuts_the_answer_short(
    streaming: Streaming,
) -> None:
    streaming.upstream.faults = [Fault("drop")]  # half the chunks, then the connection closes
    response = await streaming.session.post(streaming.url("/generate/voice"),
                                            json={"text": TEXT * 2}, headers=AUDIO)
    assert response.status == 200
    assert await response.content.readany()
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()  # no final chunk: a player never takes it for all the audio
    assert len(streaming.upstream.tts_requests()) == 1 and streaming.files() == []


async def test_a_replay_asking_for_audio_gets_its_file(streaming: Streaming) -> None:
    body = {"text": TEXT, "seed": 7, "output_format": "pcm_16000"}
    first = await streaming.client.post("/generate/voice", json=body,
                                        headers={"Accept": "audio/*"})
    streamed = await first.read()
    assert first.headers["Content-Type"] == "audio/wav"
    again = await streaming.client.post("/generate/voice", json=body,
                                        headers={"Accept": "audio/*"})
    assert again.status == 200 and again.headers["Content-Type"] == "audio/wav"
    assert "X-Stream-Url" not in again.headers  # nothing made: no stream
    (file,) = streaming.files(".wav")
    assert again.headers["X-Audio-Url"].endswith(f"/outputs/{file.name}")
    assert await again.read() == file.read_bytes()
    assert streamed[44:] == file.read_bytes()[44:]  # the header's sizes came at the end
    assert len(streaming.upstream.tts_requests()) == 1


async def test_without_accept_audio_the_answer_is_the_json_result(
    streaming: Streaming,
) -> None:
    response = await streaming.client.post(
        "/generate/voice", json={"text": TEXT},
        headers={"Accept": "application/json, audio/mpeg;q=0"})
    assert response.status == 200
    result = await response.json()
    assert result["url"].endswith(".mp3") and result["words"][0]["word"] == "Hello"
    assert result["alignment_url"].endswith(".json")


async def test_a_stream_that_is_not_here_is_a_404_saying_where(streaming: Streaming) -> None:
    elsewhere = await streaming.client.get("/streams/voice/engine-2/abc")
    assert elsewhere.status == 404
    assert "engine-2" in (await elsewhere.json())["message"]
    unknown = await streaming.client.get("/streams/voice/engine-1/no-such-stream")
    assert unknown.status == 404
    assert "completed event" in (await unknown.json())["message"]


async def test_a_client_leaving_ends_the_request_and_its_upstream_call(
    streaming: Streaming,
) -> None:
    response = await streaming.session.post(streaming.url("/generate/voice"),
                                            json={"text": TEXT * 4}, headers=AUDIO)
    assert await response.content.readany()
    response.close()  # the player goes away
    left = await asyncio.wait_for(streaming.upstream.abandoned.get(), timeout=5)
    assert left.cut_short and streaming.files() == []


async def test_a_replay_asking_for_audio_whose_file_is_in_the_store_is_sent_to_it(
    s3_store: StoreLocation, tmp_path: Path
) -> None:
    upstream = ElevenLabsServer(seconds_per_char=0.004)
    await upstream.start()
    objects = build_object_store(load_settings(storage_url=s3_store.url,
                                               storage_endpoint_url=s3_store.endpoint))
    assert objects is not None
    body = {"text": TEXT, "seed": 11}
    try:
        async with httpx.AsyncClient() as http:
            answers = []
            for name in ("a", "b"):  # two instances of a fleet, one store
                store = OutputStore(tmp_path / name / "outputs", shared=SharedOutputs(objects))
                metrics = EngineMetrics(CollectorRegistry())
                voice = VoiceService(
                    ElevenLabsBackend(http, upstream.api_url, SecretStr(DEFAULT_KEY),
                                      timeout=httpx.Timeout(5.0)),
                    store, "21m00Tcm4TlvDq8ikWAM",
                    streams=AudioStreams(tmp_path / name / "streams", "http://x", name),
                    results=VoiceResults(RememberedResults(
                        tmp_path / name / "results", shared=objects, namespace="results/voice")))
                services = AppServices(health=EngineHealth(voice_backend="elevenlabs"),
                                       metrics=metrics, store=store, codec=EventCodec(),
                                       voice=voice,
                                       scheduling=build_scheduling(load_settings(), metrics))
                app = create_app(services, UploadLimits(tmp_path / name / "uploads"))
                async with TestClient(TestServer(app, host="127.0.0.1")) as client:
                    # a: the JSON answer (once remembered); b: a replay asking for audio
                    response = await client.post("/generate/voice", json=body,
                                                 headers=AUDIO if name == "b" else {},
                                                 allow_redirects=False)
                    answers.append((response.status, response.headers.copy(),
                                    await response.read()))
                    if name == "b":  # and the URL it names serves the file from the store
                        followed = await client.get(response.headers["Location"])
                        (file,) = (tmp_path / "a" / "outputs").glob("*.mp3")
                        assert await followed.read() == file.read_bytes()
    finally:
        await upstream.stop()
    (made, _, _), (status, headers, _) = answers
    assert made == 200
    assert status == 307 and headers["Location"] == headers["X-Audio-Url"]
    assert headers["Location"].startswith("/outputs/") and headers["X-Request-Id"]
    assert len(upstream.tts_requests()) == 1


@dataclass
class Listened:
    """The app with ``streams`` (2 listeners a stream, 1 s to take a block); ``ended``
    gets the path of each request whose handler has returned (its place left)."""

    client: TestClient[web.Request, web.Application]
    session: aiohttp.ClientSession
    streams: AudioStreams
    ended: asyncio.Queue[str]

    def url(self, stream: AudioStream) -> str:
        return str(self.client.make_url(path_of(self.streams.url_for(stream))))

    async def handled(self, stream: AudioStream) -> None:
        path = path_of(self.url(stream))
        while await asyncio.wait_for(self.ended.get(), timeout=10) != path:
            pass


@pytest.fixture
async def listened(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                   ) -> AsyncIterator[Listened]:
    monkeypatch.chdir(tmp_path)
    store = OutputStore(tmp_path / "outputs", cleanup_delay=3600)
    metrics = EngineMetrics(CollectorRegistry())
    streams = AudioStreams(tmp_path / "streams", "http://engine-1:8000", "engine-1",
                           linger=30, max_listeners=2, write_timeout=1.0)
    voice = VoiceService(LocalVoiceBackend(EspeakSynthesizer()), store, "21m00Tcm4TlvDq8ikWAM",
                         streams=streams)
    services = AppServices(health=EngineHealth(voice_backend="local"), metrics=metrics,
                           store=store, codec=EventCodec(), voice=voice,
                           scheduling=build_scheduling(load_settings(), metrics))
    app = create_app(services, UploadLimits(tmp_path / "temp" / "uploads"))
    ended: asyncio.Queue[str] = asyncio.Queue()

    @web.middleware
    async def observed(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        finally:
            ended.put_nowait(request.path)

    app.middlewares.append(observed)
    async with aiohttp.ClientSession() as session, \
            TestClient(TestServer(app, host="127.0.0.1")) as client:
        yield Listened(client, session, streams, ended)


async def test_a_stream_takes_its_listeners_and_one_more_when_they_have_left(
    listened: Listened,
) -> None:
    stream = listened.streams.open("audio/mpeg")
    await stream.write(b"ID3" + bytes(1000))
    reading = await listened.session.get(listened.url(stream))
    leaving = await listened.session.get(listened.url(stream))
    assert reading.status == leaving.status == 200
    heard = await reading.content.readany()
    assert heard and await leaving.content.readany()

    refused = await listened.session.get(listened.url(stream))
    assert refused.status == 503 and refused.headers["Retry-After"] == "2"
    error = await refused.json()
    assert error["error_code"] == "UPSTREAM_UNAVAILABLE" and error["retryable"] is True
    assert "2 listeners" in error["message"]
    await listened.handled(stream)  # the refused one

    leaving.close()  # one goes away mid-stream, the other reads to the end
    await stream.write(bytes(range(256)) * 300)
    stream.finish()
    heard += await reading.read()
    await listened.handled(stream)
    await listened.handled(stream)
    assert stream.listeners == 0

    again = await listened.session.get(listened.url(stream))  # a place is free again
    assert again.status == 200 and await again.read() == heard
    assert len(heard) == 1003 + 256 * 300


async def test_a_listener_that_stops_reading_is_cut_off_and_its_place_freed(
    listened: Listened, caplog: pytest.LogCaptureFixture
) -> None:
    stream = listened.streams.open("audio/mpeg")
    await stream.write(b"ID3" + bytes(1000))
    loop = asyncio.get_running_loop()
    stalled = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills at once
    stalled.setblocking(False)
    try:
        port = listened.client.server.port
        await loop.sock_connect(stalled, ("127.0.0.1", port))
        await loop.sock_sendall(stalled, f"GET {path_of(listened.url(stream))} HTTP/1.1\r\n"
                                         "Host: 127.0.0.1\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:  # the answer has begun: its place is taken
            head += await asyncio.wait_for(loop.sock_recv(stalled, 1), timeout=10)
        assert head.startswith(b"HTTP/1.1 200")
        blocks = more_than_a_socket_holds() // (64 * 1024)
        for _ in range(blocks):
            await stream.write(bytes(64 * 1024))
        with caplog.at_level(logging.WARNING, logger="http_files.streams"):
            await listened.handled(stream)  # dropped after 1 s without taking anything
        assert stream.listeners == 0
        (said,) = [r.getMessage() for r in caplog.records if "took nothing" in r.getMessage()]
        assert stream.id in said and "connection is reset" in said

        late = await listened.session.get(listened.url(stream))
        assert late.status == 200
        assert await late.content.readexactly(1003) == b"ID3" + bytes(1000)
        stream.finish()
        assert len(await late.read()) == blocks * 64 * 1024

        received = b""
        with pytest.raises(ConnectionResetError):
            while chunk := await asyncio.wait_for(loop.sock_recv(stalled, 65536), 10):
                received += chunk
        assert not received.endswith(b"0\r\n\r\n")  # cut: no final chunk
    finally:
        stalled.close()


async def test_head_on_a_stream_answers_its_headers_alone_and_takes_no_place(
    listened: Listened,
) -> None:
    stream = listened.streams.open("audio/mpeg")
    await stream.write(b"ID3" + bytes(1000))  # still being made: a GET would wait for more
    reader, writer = await open_raw(listened.client)
    try:
        path = path_of(listened.url(stream))
        writer.write(f"HEAD {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        headed = await read_response(reader, timeout=10)
        assert headed.status == 200 and headed.headers["content-type"] == "audio/mpeg"
        assert stream.listeners == 0
        # no body came after the headers: the same connection answers its next request
        writer.write(b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        live = await read_response(reader, timeout=10)
        assert live.status == 200 and live.json()["status"] == "live"
    finally:
        writer.close()
    stream.finish()
    assert stream.listeners == 0
