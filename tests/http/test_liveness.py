"""GET /health/live over the real GPU worker (the tiny model): 200 while it is idle or busy
within LIVENESS_GPU_STUCK_SECONDS, 503 ``wedged`` once one item has held it longer, 200
again when the item ends, and 200 after a stop on purpose."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from core.health import EngineHealth
from core.image.factory import build_image_service
from core.image.worker import GpuWorker
from core.metrics import EngineMetrics
from core.outputs import OutputStore
from core.scheduling import build_scheduling
from core.settings import load_settings
from core.voice import EspeakSynthesizer, LocalVoiceBackend, VoiceService
from http_files import AppServices, create_app
from schemas.codec import EventCodec

Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def worker(tmp_path: Path, dev_model_dir: Path) -> AsyncIterator[GpuWorker]:
    settings = load_settings(output_dir=tmp_path / "outputs", _env_file=None)
    metrics = EngineMetrics(CollectorRegistry())
    async with httpx.AsyncClient() as http:
        _, gpu = await build_image_service(settings, dev_model_dir,
                                           OutputStore(settings.output_dir), http, metrics)
        try:
            yield gpu
        finally:
            await asyncio.to_thread(gpu.stop)


@pytest.fixture
def health(worker: GpuWorker) -> EngineHealth:
    return EngineHealth(voice_backend="local", kafka_enabled=False, started=True,
                        gpu_worker=worker.pulse)


@pytest.fixture
async def client(health: EngineHealth, tmp_path: Path) -> AsyncIterator[Client]:
    metrics = EngineMetrics(CollectorRegistry())
    store = OutputStore(tmp_path / "outputs")
    services = AppServices(
        health=health, metrics=metrics, store=store, codec=EventCodec(),
        voice=VoiceService(LocalVoiceBackend(EspeakSynthesizer()), store, "21m00Tcm4TlvDq8ikWAM"),
        scheduling=build_scheduling(load_settings(_env_file=None), metrics))
    async with TestClient(TestServer(create_app(services), host="127.0.0.1")) as c:
        yield c


async def live(client: Client) -> tuple[int, dict[str, Any]]:
    response = await client.get("/health/live")
    return response.status, await response.json()


async def test_liveness_fails_only_while_one_item_holds_the_worker_past_the_bound(
    client: Client, health: EngineHealth, worker: GpuWorker
) -> None:
    assert await live(client) == (200, {"status": "live",
                                        "gpu_worker": {"state": "idle", "busy_seconds": None}})
    entered, release = threading.Event(), threading.Event()

    def hold(pipeline: Any) -> str:  # an item that does not end until told to
        entered.set()
        release.wait(60)
        return "done"

    held = asyncio.wrap_future(worker.submit_exclusive(hold))
    try:
        assert await asyncio.to_thread(entered.wait, 30)
        status, body = await live(client)
        assert status == 200 and body["gpu_worker"]["state"] == "busy"
        assert body["gpu_worker"]["busy_seconds"] >= 0
        # the same item, now longer on the worker than the bound allows: wedged (the
        # bound is lowered rather than waited out; it is read at each probe)
        health.gpu_stuck_seconds = 1e-6
        status, body = await live(client)
        assert status == 503 and body["status"] == "wedged"
        assert body["gpu_worker"]["state"] == "stuck"
    finally:
        health.gpu_stuck_seconds = 900.0
        release.set()
    assert await held == "done"
    status, body = await live(client)  # (the thread may still be closing the item)
    assert status == 200 and body["status"] == "live"
    await asyncio.to_thread(worker.stop)
    status, body = await live(client)  # stopped on purpose (the engine's stop): not wedged
    assert status == 200 and body["gpu_worker"]["state"] == "stopped"


async def test_readiness_follows_start_kafka_and_draining(client: Client,
                                                          health: EngineHealth) -> None:
    async def ready() -> tuple[int, dict[str, Any]]:
        response = await client.get("/health/ready")
        return response.status, await response.json()

    assert await ready() == (200, {"status": "ready", "reasons": []})
    health.kafka_enabled, health.started = True, False
    assert await ready() == (503, {"status": "not_ready",
                                   "reasons": ["starting", "kafka_unreachable"]})
    health.started = health.kafka_connected = True
    assert await ready() == (200, {"status": "ready", "reasons": []})
    health.draining = True
    assert await ready() == (503, {"status": "not_ready", "reasons": ["draining"]})
    assert (await live(client))[0] == 200
