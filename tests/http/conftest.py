"""The whole HTTP app on a real server on 127.0.0.1, over the real cores on the tiny model:
voice (local), image and LoRA training, with uploads under a temp dir of its own.

Every request a test here sends through aiohttp's ``TestClient`` and every response it
gets are checked against ``docs/openapi.json`` (:mod:`tests.support.openapi_check`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from core.health import EngineHealth
from core.image.factory import build_image_service
from core.metrics import EngineMetrics
from core.outputs import OutputStore
from core.scheduling import build_scheduling
from core.settings import Settings, load_settings
from core.training import TrainingService, build_training_service
from core.voice import EspeakSynthesizer, LocalVoiceBackend, VoiceService
from http_files import AppServices, create_app
from http_files.uploads import UPLOADS, Uploads, upload_limits
from schemas.codec import EventCodec
from tests.support.openapi_check import check_client


@pytest.fixture(autouse=True)
def _checked_against_openapi(monkeypatch: pytest.MonkeyPatch) -> None:
    check_client(monkeypatch)


@dataclass
class Served:
    """A running app: its client, settings, training service and uploads."""

    client: TestClient[web.Request, web.Application]
    settings: Settings
    training: TrainingService
    uploads: Uploads

    @property
    def temp(self) -> Path:
        return self.settings.temp_dir

    def files(self) -> set[Path]:
        """Every file under TEMP_DIR (the step-time record aside)."""
        return {p for p in self.temp.rglob("*")
                if p.is_file() and p.name != "step_times.json"}


Serve = Callable[..., Awaitable[Served]]


@pytest.fixture
async def serve(tmp_path: Path, dev_model_dir: Path, monkeypatch: pytest.MonkeyPatch
                ) -> AsyncIterator[Serve]:
    """``await serve(stall_seconds=60.0, **settings)``: the app on its own server, built
    from settings (the tiny model, short trainings) with ``settings`` overriding."""
    monkeypatch.chdir(tmp_path)  # no stray .env
    http = httpx.AsyncClient()
    stops: list[Callable[[], Awaitable[Any]]] = []

    async def start(stall_seconds: float = 60.0, **overrides: Any) -> Served:
        settings = load_settings(**{
            "output_dir": tmp_path / "outputs", "temp_dir": tmp_path / "temp",
            "lora_output_dir": tmp_path / "loras", "lora_train_steps": 4,
            "lora_resolution": 64, "lora_checkpoint_every": 2, "progress_interval": 0.0,
            "default_inference_steps": 2, "flux_max_sequence_length": 32,
            "batch_window_ms": 0, "persona_engine_url": None, "auto_cleanup": False,
            "lora_max_image_bytes": 200_000, **overrides})
        metrics = EngineMetrics(CollectorRegistry())
        store = OutputStore(settings.output_dir, cleanup_delay=None)
        image, worker = await build_image_service(settings, dev_model_dir, store, http, metrics)
        stops.append(lambda: asyncio.to_thread(worker.stop))
        training = build_training_service(settings, worker, image, http)
        stops.append(training.close)
        services = AppServices(
            health=EngineHealth(voice_backend="local"), metrics=metrics, store=store,
            codec=EventCodec(), image=image, training=training, scheduling=build_scheduling(
                settings, metrics),
            voice=VoiceService(LocalVoiceBackend(EspeakSynthesizer()), store,
                               settings.default_voice_id))
        app = create_app(services, replace(upload_limits(settings),
                                           stall_seconds=stall_seconds))
        client = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        stops.append(client.close)
        return Served(client, settings, training, app[UPLOADS])

    yield start
    for stop in reversed(stops):
        await stop()
    await http.aclose()
