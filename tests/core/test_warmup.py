"""The warm-up before readiness, on the tiny model (CPU), eager: one image at the size
requests get by default, made while readiness says ``warming`` and not counted by metrics;
a model that cannot make an image here fails start-up with one line, its worker stopped.
The compiled model's warm-up: tests/integration/test_warmup.py."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from core.health import EngineHealth
from core.image.factory import build_image_service
from core.image.loader import ModelLoadError
from core.image.warmup import compiled_graphs, warm_up
from core.metrics import EngineMetrics
from core.outputs import OutputStore
from core.settings import Settings, load_settings

WAIT = 120.0  # seconds; a bound for start-up on a busy CPU, never a sleep


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


def settings_for(tmp_path: Path, **overrides: object) -> Settings:
    return load_settings(output_dir=tmp_path / "outputs", _env_file=None, **overrides)


def observed(metrics: EngineMetrics, name: str) -> float:
    return metrics.registry.get_sample_value(name) or 0.0


async def test_an_eager_model_makes_one_uncounted_image_while_readiness_says_warming(
    tmp_path: Path, dev_model_dir: Path, http: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="core.image.warmup")
    settings = settings_for(tmp_path)
    metrics = EngineMetrics(CollectorRegistry())
    health = EngineHealth(voice_backend="local", kafka_enabled=False)
    building = asyncio.create_task(build_image_service(
        settings, dev_model_dir, OutputStore(settings.output_dir), http, metrics,
        health=health))
    await health.wait_until(lambda h: h.warming or building.done(), timeout=WAIT)
    assert health.readiness() == {"status": "not_ready", "reasons": ["starting", "warming"]}
    _, worker = await asyncio.wait_for(building, WAIT)
    try:
        assert not health.warming
        assert health.readiness() == {"status": "not_ready", "reasons": ["starting"]}
        (line,) = [r.getMessage() for r in caplog.records if r.name == "core.image.warmup"]
        assert line.startswith("warm-up: 1 image(s) at 1024x1024 in ")  # the default size
        assert "0 graph(s) compiled" in line
        # no request asked for it: the image metrics start from nothing
        assert observed(metrics, "engine_image_batch_size_count") == 0
        assert observed(metrics, "engine_image_batch_seconds_count") == 0
        assert worker.pulse().state == "idle" and worker.loaded_loras == []
    finally:
        await asyncio.to_thread(worker.stop)


async def test_the_warm_up_of_an_eager_model_is_one_base_image_that_compiles_nothing(
    tmp_path: Path, dev_model_dir: Path, http: httpx.AsyncClient,
) -> None:
    settings = settings_for(tmp_path, max_image_size=256)
    _, worker = await build_image_service(
        settings, dev_model_dir, OutputStore(settings.output_dir), http,
        EngineMetrics(CollectorRegistry()))
    try:
        graphs = compiled_graphs()
        done = await warm_up(worker, size=256, max_batch_size=4)
        assert [image.label for image in done.images] == ["base model"]
        assert done.graphs == 0 and compiled_graphs() == graphs
        assert done.seconds >= done.images[0].seconds > 0
    finally:
        await asyncio.to_thread(worker.stop)


@pytest.fixture
def attention_backend_restored() -> Iterator[None]:
    """diffusers keeps the last attention backend set process-wide: put it back."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    active = _AttentionBackendRegistry.get_active_backend()[0]
    try:
        yield
    finally:
        _AttentionBackendRegistry.set_active_backend(active)


@pytest.mark.usefixtures("attention_backend_restored")
async def test_a_model_that_cannot_make_an_image_here_fails_start_up_with_its_worker_stopped(
    tmp_path: Path, dev_model_dir: Path, http: httpx.AsyncClient,
) -> None:
    # cuDNN attention loads on a CPU and fails at the first image: without the warm-up the
    # instance would say ready and fail every request
    settings = settings_for(tmp_path, attention_backend="_native_cudnn")
    health = EngineHealth(voice_backend="local", kafka_enabled=False)
    workers_before = {t for t in threading.enumerate() if t.name == "gpu-worker"}
    with pytest.raises(ModelLoadError) as caught:
        await build_image_service(settings, dev_model_dir, OutputStore(settings.output_dir),
                                  http, EngineMetrics(CollectorRegistry()), health=health)
    message = str(caught.value)
    assert message.startswith(f"image model at {dev_model_dir} failed its warm-up: ")
    assert "scaled_dot_product_attention" in message and "\n" not in message
    assert caught.value.path == dev_model_dir
    assert not health.warming
    assert {t for t in threading.enumerate() if t.name == "gpu-worker"} <= workers_before
