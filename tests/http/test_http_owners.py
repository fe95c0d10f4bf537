"""Whom an HTTP request is scheduled as: its conversation, or, when it names none (the
original API's bodies), a conversation of its own, so that one client's slow requests do
not take the share of every other client; its voice calls queue upstream as that owner at
its priority. Its answers and cancels keep the ``conversation_id`` "http"."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from core.health import EngineHealth
from core.metrics import EngineMetrics
from core.outputs import OutputStore
from core.scheduling import Placement, Priority, Scheduling, build_scheduling
from core.settings import load_settings
from core.voice import (
    AudioSink,
    EspeakSynthesizer,
    LocalVoiceBackend,
    VoiceService,
    VoiceSettings,
    current_placement,
)
from core.voice.timing import Alignment
from http_files import AppServices, create_app
from schemas.codec import EventCodec


class PlacedVoice:
    """The local voice, noting the place each call queues as and holding the texts that
    begin with "Slow" until :attr:`release` is set."""

    def __init__(self) -> None:
        self._local = LocalVoiceBackend(EspeakSynthesizer())
        self.placements: dict[str, Placement] = {}
        self.release = asyncio.Event()

    @property
    def name(self) -> str:
        return self._local.name

    @property
    def audio_variant(self) -> str:
        return self._local.audio_variant

    @property
    def default_output_format(self) -> str:
        return self._local.default_output_format

    def performs_audio_tags(self, model_id: str | None) -> bool:
        return self._local.performs_audio_tags(model_id)

    async def synthesize_to(self, path: Path, text: str, settings: VoiceSettings,
                            sink: AudioSink | None = None) -> Alignment | None:
        self.placements[text] = current_placement()
        if text.startswith("Slow"):
            await self.release.wait()
        return await self._local.synthesize_to(path, text, settings, sink)


@dataclass
class App:
    client: TestClient[web.Request, web.Application]
    voice: PlacedVoice
    scheduling: Scheduling

    async def speak(self, text: str, **fields: Any) -> tuple[int, Any]:
        response = await self.client.post("/generate/voice", json={
            "text": text, "inject_emotion": False, **fields})
        return response.status, await response.json()

    async def voice_in_use(self, slots: int) -> None:
        """Waits until ``slots`` voice requests hold a slot (checked at every arrival)."""
        await self.scheduling.pending.wait_until(
            lambda _: self.scheduling.admission.in_use("voice") == slots, timeout=30)


@pytest.fixture
async def app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[App]:
    monkeypatch.chdir(tmp_path)  # no stray .env
    settings = load_settings(output_dir=tmp_path / "outputs", temp_dir=tmp_path / "temp",
                             persona_engine_url=None, auto_cleanup=False,
                             max_in_flight_per_conversation=2)
    metrics = EngineMetrics(CollectorRegistry())
    store = OutputStore(settings.output_dir, cleanup_delay=None)
    voice = PlacedVoice()
    scheduling = build_scheduling(settings, metrics)
    services = AppServices(health=EngineHealth(voice_backend="local"), metrics=metrics,
                           store=store, codec=EventCodec(), scheduling=scheduling,
                           voice=VoiceService(voice, store, settings.default_voice_id))
    client = TestClient(TestServer(create_app(services), host="127.0.0.1"))
    await client.start_server()
    try:
        yield App(client, voice, scheduling)
    finally:
        voice.release.set()
        await client.close()


async def test_clients_naming_no_conversation_do_not_share_one_conversations_share(
    app: App,
) -> None:
    slow = [asyncio.create_task(app.speak(f"Slow line number {n}.")) for n in range(2)]
    await app.voice_in_use(2)  # as many as one conversation may have in flight
    status, body = await app.speak("Hello there.")  # another client, no conversation named
    assert status == 200, body
    app.voice.release.set()
    assert [(await task)[0] for task in slow] == [200, 200]


async def test_a_named_conversation_still_has_its_share_only(app: App) -> None:
    slow = [asyncio.create_task(app.speak(f"Slow line number {n}.", conversation_id="chat-1"))
            for n in range(2)]
    await app.voice_in_use(2)
    status, body = await app.speak("One more.", conversation_id="chat-1")
    assert status == 503, body
    status, body = await app.speak("Meanwhile, elsewhere.", conversation_id="chat-2")
    assert status == 200, body
    app.voice.release.set()
    assert [(await task)[0] for task in slow] == [200, 200]


async def test_voice_calls_queue_as_the_requests_owner_and_priority(app: App) -> None:
    status, _ = await app.speak("An old line.", request_id="replayed-1", priority="background")
    assert status == 200
    status, _ = await app.speak("A live line.", conversation_id="chat-7")
    assert status == 200
    placed = {text: (p.owner, p.priority) for text, p in app.voice.placements.items()}
    assert placed == {"An old line.": ("http:replayed-1", Priority.BACKGROUND),
                      "A live line.": ("chat-7", Priority.INTERACTIVE)}


async def test_a_request_naming_no_conversation_is_still_cancelled_as_conversation_http(
    app: App,
) -> None:
    slow = asyncio.create_task(app.speak("Slow and then cancelled.", request_id="slow-1"))
    await app.voice_in_use(1)
    response = await app.client.delete("/requests/slow-1", params={"conversation_id": "http"})
    assert response.status == 200
    assert (await response.json())["status"] == "cancelled"
    status, body = await slow
    assert (status, body["error_code"]) == (409, "CANCELLED")
