"""A remembered result is answered again only while its files have a useful life left
(``core.remembered.useful_life``): a replay that arrives shortly before the files expire is
made again, with a whole life, instead of answering a URL that dies before the caller
fetches it. Images (tiny model, CPU, 64 px, 2 steps), voice (a local ElevenLabs), and a
result made by another instance of a fleet (its files only in the shared store, moto)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from pydantic import SecretStr

from core.image import GpuWorker, load_pipeline
from core.image.params import ImageLimits
from core.image.prompts import PromptOptimizer
from core.image.results import ResultCache
from core.image.service import ImageService, ModelIdentity
from core.lora import LoraRegistry
from core.outputs import OutputStore
from core.remembered import MIN_USEFUL_LIFE_S, RememberedResults, looked_up, useful_life
from core.settings import load_settings
from core.storage import SharedOutputs, build_object_store
from core.voice import ElevenLabsBackend, VoiceResults, VoiceService
from schemas.events import ImageRequested, VoiceRequested
from tests.support.elevenlabs_server import DEFAULT_KEY, ElevenLabsServer, RecordingSleep
from tests.support.s3_server import StoreLocation

LIFE = 3600.0  # CLEANUP_DELAY of these tests' outputs
MARGIN = useful_life(LIFE)  # 360 s


class Clock:
    """Wall-clock seconds that move only when a test moves them."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_the_useful_life_is_a_share_of_cleanup_delay_with_a_floor() -> None:
    assert useful_life(3600) == 360 and useful_life(86400) == 8640
    assert useful_life(300) == MIN_USEFUL_LIFE_S == 60
    assert useful_life(30) == 15  # at most half a short life: replays still answer
    assert useful_life(None) == 0  # files that never expire


@pytest.fixture
def worker(dev_model_dir: Path) -> Iterator[GpuWorker]:
    model = load_pipeline(dev_model_dir, device="cpu", use_fp16=False, memory_mode="none",
                          attention_backend="native", compile_transformer=False)
    gpu = GpuWorker(model, max_batch_size=4, batch_window_ms=0, lora_cache_size=4,
                    vae_tiling_threshold=1536, max_sequence_length=32)
    gpu.start()
    yield gpu
    gpu.stop(timeout=60)


def pixels(store: OutputStore, filename: str) -> np.ndarray:
    path = store.resolve(filename)
    assert path is not None, filename
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


async def test_an_image_replay_near_expiry_is_made_again_with_a_whole_life(
    worker: GpuWorker, tmp_path: Path
) -> None:
    clock = Clock()
    store = OutputStore(tmp_path / "outputs", cleanup_delay=LIFE, clock=clock)
    service = ImageService(
        worker, LoraRegistry(tmp_path / "loras"), store, PromptOptimizer(None),
        ResultCache(RememberedResults(tmp_path / "outputs" / ".results")),
        ImageLimits(max_image_size=256, default_steps=2, default_size=64),
        ModelIdentity("flux-tiny-dev", True, "tiny"), progress_interval=0.0)
    asked = ImageRequested.model_validate(
        {"request_id": "r-1", "conversation_id": "c", "prompt": "a park", "width": 64,
         "height": 64, "num_inference_steps": 2, "optimize_prompt": False, "seed": 11})
    first = await service.generate(asked)

    clock.now += LIFE - MARGIN - 1  # a useful life left: answered from the cache
    assert (await service.generate(asked)).url == first.url

    clock.now += MARGIN + 0.5  # 0.5 s left: that URL would be dead in a second
    replay = await service.generate(asked)
    assert replay.url != first.url
    assert np.array_equal(pixels(store, replay.filename), pixels(store, first.filename))
    clock.now += 1  # the caller fetches it: the old file is gone, the new one served
    assert store.resolve(first.filename) is None
    assert store.resolve(replay.filename) is not None
    assert (await service.generate(asked)).url == replay.url  # and remembered anew


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


async def test_a_voice_replay_near_expiry_is_spoken_again(
    http: httpx.AsyncClient, server: ElevenLabsServer, tmp_path: Path
) -> None:
    clock = Clock()
    store = OutputStore(tmp_path / "outputs", cleanup_delay=LIFE, clock=clock)
    backend = ElevenLabsBackend(http, server.api_url, SecretStr(DEFAULT_KEY),
                                sleep=RecordingSleep())
    service = VoiceService(backend, store, "21m00Tcm4TlvDq8ikWAM", results=VoiceResults(
        RememberedResults(tmp_path / "outputs" / ".voice-results")))
    asked = VoiceRequested.model_validate(
        {"request_id": "r-1", "conversation_id": "c", "text": "Hello, darling!", "seed": 5})
    first = await service.generate(asked)

    clock.now += LIFE - MARGIN - 1
    assert (await service.generate(asked)).url == first.url and server.tts_calls == 1

    clock.now += 2
    again = await service.generate(asked)
    assert server.tts_calls == 2 and again.url != first.url
    before, after = (r.json for r in server.tts_requests())
    assert after == before  # the same text, settings and seed
    clock.now += MARGIN  # the first file is gone by now; the new one lives on
    assert store.resolve(first.filename) is None and store.resolve(again.filename)


async def test_a_result_made_by_another_instance_counts_its_life_in_the_store(
    s3_store: StoreLocation, tmp_path: Path
) -> None:
    clock = Clock()
    objects = build_object_store(load_settings(
        _env_file=None, storage_url=s3_store.url, storage_endpoint_url=s3_store.endpoint))
    assert objects is not None

    def instance(name: str) -> tuple[OutputStore, RememberedResults]:
        shared = SharedOutputs(objects, clock=clock)
        return (OutputStore(tmp_path / name, cleanup_delay=LIFE, clock=clock, shared=shared),
                RememberedResults(tmp_path / name / ".results", shared=objects))

    writer, written = instance("a")
    stored = writer.write(b"\x89PNG fake image", "png")
    written.put("k1", {"filename": stored.filename})
    reader, remembered = instance("b")  # its disk has neither the file nor the entry

    async def usable() -> bool:
        entry, current = await looked_up(remembered.get, reader, "k1",
                                         lambda e: [e["filename"]], shared=True)
        assert entry == {"filename": stored.filename}
        return current

    assert reader.resolve(stored.filename) is None
    clock.now += LIFE - MARGIN - 1
    assert await usable()
    clock.now += 2
    assert not await usable()
    assert reader.exists(stored.filename)  # still an output, only too short-lived
