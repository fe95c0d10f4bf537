"""Real local upstreams and clients shared by the core tests (each test gets its own)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.image import GpuWorker
from core.image.loader import LoadedModel
from core.metrics import EngineMetrics
from core.outputs import OutputStore
from tests.support.elevenlabs_server import ElevenLabsServer
from tests.support.persona_server import PersonaLLMServer


@pytest.fixture
async def server() -> AsyncIterator[ElevenLabsServer]:
    """A local ElevenLabs making short audio (4 ms per character) for fast tests."""
    s = ElevenLabsServer(seconds_per_char=0.004)
    await s.start()
    yield s
    await s.stop()


@pytest.fixture
async def llm() -> AsyncIterator[PersonaLLMServer]:
    s = PersonaLLMServer()
    await s.start()
    yield s
    await s.stop()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


@pytest.fixture
def store(tmp_path: Path) -> OutputStore:
    return OutputStore(tmp_path / "outputs")


WORKER_STOP_WAIT = 120


@pytest.fixture
def workers() -> Iterator[list[GpuWorker]]:
    """The GPU workers a test starts (:func:`start_worker`), stopped after it."""
    started: list[GpuWorker] = []
    yield started
    for worker in started:
        worker.stop(timeout=WORKER_STOP_WAIT)


def start_worker(workers: list[GpuWorker], model: LoadedModel,
                 metrics: EngineMetrics | None = None, **overrides: Any) -> GpuWorker:
    """A GPU worker on ``model`` (batches up to 4, no batch window), started and added to
    ``workers``; ``overrides`` change its options."""
    options: dict[str, Any] = {"max_batch_size": 4, "batch_window_ms": 0, "lora_cache_size": 2,
                               "vae_tiling_threshold": 1536, "max_sequence_length": 32,
                               "metrics": metrics}
    options.update(overrides)
    worker = GpuWorker(model, **options)
    worker.start()
    workers.append(worker)
    return worker
