"""A voice abandoned by its caller while it is made, through the core with the local
ElevenLabs: kept for the request's next delivery (a revoked record), which joins it (one
upstream call, one stream) unless the request is cancelled meanwhile (then its upstream
call and its stream end); its registration is forgotten when the voice ends either way."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from core.outputs import OutputStore
from core.remembered import RememberedResults
from core.scheduling import PendingRequest, PendingRequests, Priority
from core.voice import (
    AudioStream,
    AudioStreams,
    ElevenLabsBackend,
    StreamAborted,
    VoiceResult,
    VoiceResults,
    VoiceService,
)
from schemas.events import VoiceRequested
from tests.support.elevenlabs_server import DEFAULT_KEY, ElevenLabsServer

WAIT = 10.0
TEXT = "Hello there, my friend. It is good to hear you again! " * 3


@pytest.fixture
async def paced() -> AsyncIterator[ElevenLabsServer]:
    """Audio that streams for a few seconds (some 70 chunks, 0.05 s apart)."""
    s = ElevenLabsServer(seconds_per_char=0.02, time_to_first_chunk=0.05,
                         chunk_interval=0.05, chunk_bytes=1024)
    await s.start()
    yield s
    await s.stop()


@pytest.fixture
def service(paced: ElevenLabsServer, http: httpx.AsyncClient, store: OutputStore,
            tmp_path: Path) -> VoiceService:
    backend = ElevenLabsBackend(http, paced.api_url, SecretStr(DEFAULT_KEY),
                                timeout=httpx.Timeout(5.0))
    return VoiceService(
        backend, store, "21m00Tcm4TlvDq8ikWAM",
        results=VoiceResults(RememberedResults(store.directory / ".voice-results")),
        streams=AudioStreams(tmp_path / "streams", "http://engine-1:8000", "engine-1"))


class Delivery:
    """One delivery of a Kafka voice request: registered as the consume loop registers it,
    told of its stream."""

    def __init__(self, registry: PendingRequests, request: VoiceRequested) -> None:
        self.request = request
        self.pending: PendingRequest = registry.add(request.request_id,
                                                    request.conversation_id or "", "voice",
                                                    Priority.INTERACTIVE)
        self.streams: asyncio.Queue[AudioStream] = asyncio.Queue()

    async def on_stream(self, stream: AudioStream, url: str) -> None:
        self.streams.put_nowait(stream)

    def start(self, service: VoiceService) -> asyncio.Task[VoiceResult]:
        return asyncio.ensure_future(service.generate(
            self.request, on_stream=self.on_stream, keep_when_abandoned=self.pending))


async def drain(stream: AudioStream) -> bytes:
    return b"".join([block async for block in stream.read()])


async def revoked(work: asyncio.Task[VoiceResult]) -> None:
    work.cancel()
    with pytest.raises(asyncio.CancelledError):
        await work


def asked() -> VoiceRequested:
    return VoiceRequested.model_validate({"request_id": "r-1", "conversation_id": "c",
                                          "text": TEXT, "inject_emotion": False})


async def test_a_revoked_voice_goes_on_and_its_next_delivery_joins_it(
    service: VoiceService, paced: ElevenLabsServer, store: OutputStore
) -> None:
    registry = PendingRequests()
    first = Delivery(registry, asked())
    work = first.start(service)
    stream = await asyncio.wait_for(first.streams.get(), WAIT)
    listener = asyncio.ensure_future(drain(stream))
    await revoked(work)
    assert first.pending.kept and registry.find("r-1") == [first.pending]
    again = Delivery(registry, asked())  # the record delivered again
    result = await asyncio.wait_for(again.start(service), WAIT)
    registry.remove(again.pending)  # answered
    path = store.resolve(result.filename)
    assert path is not None
    assert await asyncio.wait_for(listener, WAIT) == path.read_bytes()  # never cut
    assert paced.tts_calls == 1 and paced.abandoned.empty()  # paid for once
    assert again.streams.empty()  # no second stream: the first one's URL stays the one
    assert registry.find("r-1") == []  # the kept registration ended with its voice


async def test_a_revoked_voice_whose_request_is_cancelled_is_stopped(
    service: VoiceService, paced: ElevenLabsServer, store: OutputStore
) -> None:
    registry = PendingRequests()
    first = Delivery(registry, asked())
    work = first.start(service)
    stream = await asyncio.wait_for(first.streams.get(), WAIT)
    listener = asyncio.ensure_future(drain(stream))
    await revoked(work)
    assert registry.cancel("c", "r-1") == [first.pending]  # DELETE /requests, a control record
    with pytest.raises(StreamAborted):
        await asyncio.wait_for(listener, WAIT)
    left = await asyncio.wait_for(paced.abandoned.get(), WAIT)
    assert left.cut_short  # its upstream call ended
    await registry.wait_until(lambda r: not r.find("r-1"), timeout=WAIT)
    assert [p for p in store.directory.iterdir() if p.is_file()] == []
