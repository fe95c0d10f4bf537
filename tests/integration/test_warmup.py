"""A compiled model (COMPILE_TRANSFORMER=true) on the tiny model (CPU): compiled before the
instance is ready, then never again.

The image core is built as the engine builds it (``build_image_service`` with its
``EngineHealth``) behind the real HTTP app: ``/health/ready`` answers 503 with ``warming``
while the warm-up images are made (the compilation), and 200 once they are done and the
engine has started. After that, images without a LoRA, with one, with another, back to the
base model and back to a LoRA, at other sizes and batch sizes, with a negative prompt and
image-to-image, compile no graph at all: torch's own count of compiled graphs does not
move, and torch is told to fail any recompilation (``set_stance("fail_on_recompile")``).
The hot-swapped LoRAs change the pixels; the base model and each LoRA give the same pixels
every time they come back."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import PIL.Image
import pytest
import torch
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from PIL.Image import Image
from prometheus_client import CollectorRegistry

from core.health import EngineHealth
from core.image import GpuWorker, ImageJob
from core.image.devmodel import make_dev_lora
from core.image.factory import build_image_service
from core.image.warmup import compiled_graphs
from core.lora import LoraInfo, LoraRegistry
from core.metrics import EngineMetrics
from core.outputs import OutputStore
from core.scheduling import build_scheduling
from core.settings import Settings, load_settings
from core.voice import EspeakSynthesizer, LocalVoiceBackend, VoiceService
from http_files import AppServices, create_app
from schemas.codec import EventCodec

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:torch"),  # inductor's own imports
]

Client = TestClient[web.Request, web.Application]
WAIT = 480.0  # seconds: compiling on a busy 2-core CPU; a bound, never a sleep


@pytest.fixture
def health() -> EngineHealth:
    return EngineHealth(voice_backend="local", kafka_enabled=False)


@pytest.fixture
async def client(health: EngineHealth, tmp_path: Path) -> AsyncIterator[Client]:
    """The engine's HTTP app over ``health``, as it answers during start-up."""
    metrics = EngineMetrics(CollectorRegistry())
    store = OutputStore(tmp_path / "outputs")
    services = AppServices(
        health=health, metrics=metrics, store=store, codec=EventCodec(),
        voice=VoiceService(LocalVoiceBackend(EspeakSynthesizer()), store,
                           "21m00Tcm4TlvDq8ikWAM"),
        scheduling=build_scheduling(load_settings(_env_file=None), metrics))
    async with TestClient(TestServer(create_app(services), host="127.0.0.1")) as c:
        yield c


@pytest.fixture
def loras(dev_model_dir: Path, tmp_path: Path) -> dict[str, LoraInfo]:
    registry = LoraRegistry(tmp_path / "loras")
    return {name: registry.register(
        name, make_dev_lora(dev_model_dir, tmp_path / "made" / f"{name}.safetensors",
                            seed=seed), trigger_word=None, base_model="flux-tiny-dev")
            for seed, name in enumerate(("sarah", "emma"), start=1)}


async def ready(client: Client) -> tuple[int, dict[str, Any]]:
    response = await client.get("/health/ready")
    return response.status, await response.json()


def job(size: tuple[int, int] = (256, 256), lora: LoraInfo | None = None,
        count: int = 1) -> ImageJob:
    return ImageJob(prompt="a lighthouse", negative_prompt=None, width=size[0],
                    height=size[1], steps=2, guidance=3.5, true_cfg_scale=1.0, seed=7,
                    lora=lora, count=count)


async def pixels(worker: GpuWorker, made: ImageJob) -> list[np.ndarray[Any, Any]]:
    images: list[Image] = await worker.generate_all(made)
    assert [image.size for image in images] == [(made.width, made.height)] * made.count
    return [np.asarray(image, dtype=np.float64) for image in images]


def same(images: list[np.ndarray[Any, Any]], expected: np.ndarray[Any, Any]) -> bool:
    return len(images) == 1 and np.array_equal(images[0], expected)


async def test_compiled_before_ready_then_no_recompilation_across_loras_sizes_and_batches(
    tmp_path: Path, dev_model_dir: Path, client: Client, health: EngineHealth,
    loras: dict[str, LoraInfo],
) -> None:
    settings = load_settings(output_dir=tmp_path / "outputs", compile_transformer=True,
                             max_batch_size=4, _env_file=None)
    async with httpx.AsyncClient() as http:
        building = asyncio.create_task(build_image_service(
            settings, dev_model_dir, OutputStore(settings.output_dir), http,
            EngineMetrics(CollectorRegistry()), health=health))
        await health.wait_until(lambda h: h.warming or building.done(), timeout=WAIT)
        assert await ready(client) == (
            503, {"status": "not_ready", "reasons": ["starting", "warming"]})
        graphs_at_warming = compiled_graphs()
        _, worker = await asyncio.wait_for(building, WAIT)
    try:
        assert worker.model.compiled and worker.model.hotswap_slot
        assert compiled_graphs() > graphs_at_warming  # the warm-up compiled
        assert await ready(client) == (503, {"status": "not_ready", "reasons": ["starting"]})
        health.started = True  # what Engine.start does once the image core is built
        assert await ready(client) == (200, {"status": "ready", "reasons": []})

        graphs = compiled_graphs()
        sarah, emma = loras["sarah"], loras["emma"]
        with torch.compiler.set_stance("fail_on_recompile"):
            (base,) = await pixels(worker, job())
            (first,) = await pixels(worker, job(lora=sarah))  # the first LoRA after base
            assert same(await pixels(worker, job()), base)  # back to the base model
            assert same(await pixels(worker, job(lora=sarah)), first)  # back, not reloaded
            # a scale other than 1: the slot's scaling values, not a new graph
            (half,) = await pixels(worker, dataclasses.replace(job(lora=sarah),
                                                               lora_scale=0.5))
            assert same(await pixels(worker, job(lora=sarah)), first)  # back to scale 1
            (second,) = await pixels(worker, job(lora=emma))
            assert same(await pixels(worker, job(lora=sarah)), first)  # reloaded into the slot
            assert same(await pixels(worker, job()), base)
            # other sizes and batch sizes, with and without a LoRA
            await pixels(worker, job((768, 512), count=3))
            await pixels(worker, job((512, 1024), lora=emma, count=2))
            await pixels(worker, job((1024, 1024)))  # the default size
            # a negative prompt (true CFG: two passes a step), image-to-image
            await pixels(worker, dataclasses.replace(job(lora=sarah), negative_prompt="fog",
                                                     true_cfg_scale=4.0))
            await pixels(worker, dataclasses.replace(
                job((320, 192)), init_image=PIL.Image.new("RGB", (320, 192), "navy"),
                strength=0.6, steps=4))
        assert compiled_graphs() == graphs
        assert np.abs(first - base).mean() > 1.0 and np.abs(second - base).mean() > 1.0
        assert not np.array_equal(first, second)
        # half the LoRA: between the base and the full LoRA
        assert 0 < np.abs(half - base).mean() < np.abs(first - base).mean()
        # the silenced slot is the base model: the eager model's pixels, within float noise
        eager = await eager_worker(settings, dev_model_dir)
        try:
            (eager_base,) = await pixels(eager, job())
        finally:
            await asyncio.to_thread(eager.stop)
        assert np.abs(base - eager_base).max() <= 2.0
    finally:
        await asyncio.to_thread(worker.stop)


async def eager_worker(settings: Settings, model_dir: Path) -> GpuWorker:
    async with httpx.AsyncClient() as http:
        _, worker = await build_image_service(
            settings.model_copy(update={"compile_transformer": False}), model_dir,
            OutputStore(settings.output_dir), http, EngineMetrics(CollectorRegistry()))
    return worker
