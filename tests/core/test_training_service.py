"""The training service on the tiny model: a LoRA that learned (a fixed probe's loss goes
down), registered and usable at once; replays; stop and resume from the checkpoint;
image requests between chunks; HTTP-started trainings picked up after a restart; locks,
statuses and folders that do not pile up."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client import CollectorRegistry
from safetensors.torch import load_file

from core.image.factory import build_image_service
from core.image.service import ImageService
from core.image.worker import GpuWorker
from core.lora import LoraRegistry
from core.metrics import EngineMetrics
from core.outputs import OutputStore
from core.settings import Settings, load_settings
from core.training import TrainingService, build_training_service
from core.training.checkpoint import TrainingFolder
from core.training.encode import encode_training_data
from core.training.images import check_image
from core.training.pixels import to_pixels
from core.training.spec import Origin, TrainingLimits, TrainingSpec, training_id_for
from core.training.status import State, StatusBoard, TrainingStatus
from core.training.trainer import probe_loss
from schemas.errors import InvalidRequestError
from schemas.events import ImageRequested, InlineImage, LoraTrainingRequested
from tests.core.test_training_images import photos

WAIT = 60.0


@dataclass
class Core:
    settings: Settings
    image: ImageService
    store: OutputStore
    worker: GpuWorker
    http: httpx.AsyncClient

    def training(self, **overrides: Any) -> TrainingService:
        settings = self.settings.model_copy(update=overrides)
        return build_training_service(settings, self.worker, self.image, self.http)


@pytest.fixture
async def core(tmp_path: Path, dev_model_dir: Path, monkeypatch: pytest.MonkeyPatch
               ) -> AsyncIterator[Core]:
    monkeypatch.chdir(tmp_path)  # no stray .env
    settings = load_settings(
        output_dir=tmp_path / "outputs", temp_dir=tmp_path / "temp",
        lora_output_dir=tmp_path / "loras", lora_train_steps=60, lora_resolution=64,
        lora_learning_rate=1e-3, lora_checkpoint_every=20, progress_interval=0.0,
        default_inference_steps=4, flux_max_sequence_length=32, batch_window_ms=0,
        persona_engine_url=None, auto_cleanup=False,
    )
    http = httpx.AsyncClient()
    store = OutputStore(settings.output_dir, cleanup_delay=None)
    image, worker = await build_image_service(settings, dev_model_dir, store, http,
                                              EngineMetrics(CollectorRegistry()))
    yield Core(settings, image, store, worker, http)
    await asyncio.to_thread(worker.stop)
    await http.aclose()


def request(**fields: Any) -> LoraTrainingRequested:
    values: dict[str, Any] = {
        "request_id": str(uuid.uuid4()), "character_id": "mia", "trigger_word": "zqx",
        "images": [InlineImage(filename=f"{i}.img", data=d) for i, d in enumerate(photos(5))],
    }
    values.update(fields)
    return LoraTrainingRequested(**values)


Progress = list[tuple[int, int, float | None]]


def recorder(into: Progress, when: Callable[[int], None] | None = None
             ) -> Callable[[int, int, float | None], Awaitable[None]]:
    async def listen(step: int, total: int, loss: float | None) -> None:
        into.append((step, total, loss))
        if when is not None:
            when(step)
    return listen


async def image_of(core: Core, prompt: str, lora_id: str | None = None) -> tuple[str, Any]:
    result = await core.image.generate(ImageRequested(
        request_id=str(uuid.uuid4()), conversation_id="c", prompt=prompt, seed=5, width=64,
        height=64, num_inference_steps=4, character_lora_id=lora_id, optimize_prompt=False))
    path = core.store.resolve(result.filename)
    assert path is not None
    return result.prompt, np.asarray(Image.open(path).convert("RGB"))


async def probe(core: Core, lora_file: Path | None = None) -> float:
    """The fixed probe on the request's images, base model or with ``lora_file`` loaded."""
    pixels = to_pixels(photos(5), 64)

    def measure(pipeline: Any) -> float:
        cache = encode_training_data(pipeline, pixels, "a photo of zqx", max_sequence_length=32)
        if lora_file is None:
            return probe_loss(pipeline.transformer, cache, device="cpu", dtype=torch.float32)
        with warnings.catch_warnings():  # beside the worker's adapters, on purpose
            warnings.simplefilter("ignore", UserWarning)
            pipeline.load_lora_weights(str(lora_file), adapter_name="probe_check")
            pipeline.set_adapters(["probe_check"])
            try:
                return probe_loss(pipeline.transformer, cache, device="cpu", dtype=torch.float32)
            finally:
                pipeline.delete_adapters(["probe_check"])
    return await core.worker.run_exclusive(measure)


async def test_training_lowers_the_probe_loss_and_registers_a_usable_lora(core: Core) -> None:
    training = core.training(lora_train_steps=150)
    base_probe = await probe(core)
    seen: Progress = []
    # a fixed request id: its training id seeds the run, so the loss path is the same always
    outcome = await training.train(request(request_id="probe-1"), recorder(seen))
    assert outcome.lora_id == "mia_v1" and outcome.trigger_word == "zqx"
    assert outcome.training_id.startswith("mia_") and not outcome.replayed

    info = LoraRegistry(core.settings.lora_output_dir).get("mia_v1")
    trained_probe = await probe(core, info.path)
    assert trained_probe < 0.9 * base_probe, (base_probe, trained_probe)
    meta = info.training or {}
    assert meta["probe_loss_start"] == pytest.approx(base_probe, rel=1e-4)
    assert meta["probe_loss_end"] == pytest.approx(trained_probe, rel=1e-3)
    assert (info.trigger_word, info.rank, info.alpha) == ("zqx", 16, 16.0)
    assert info.targets == ("to_k", "to_out.0", "to_q", "to_v")
    assert info.base_model == "flux-tiny-dev"
    assert meta["training_id"] == outcome.training_id and meta["images"] == 5
    assert meta["steps"] == 150 and meta["caption"] == "a photo of zqx"
    assert meta["validation_image_url"] == outcome.validation_image_url
    assert outcome.validation_image_url and outcome.validation_image_url.startswith("/outputs/")
    assert len(load_file(str(info.path))) == 14

    steps = [step for step, _, _ in seen]
    assert steps == sorted(steps) and steps[0] == 1 and steps[-1] == 150
    assert all(total == 150 and loss is not None and loss > 0 for _, total, loss in seen)
    assert not (core.settings.temp_dir / "training" / outcome.training_id).exists()

    prompt, with_lora = await image_of(core, "in a park", "mia_v1")
    assert prompt == "zqx, in a park"  # the trigger word is put in the prompt
    _, without = await image_of(core, prompt)
    assert not np.array_equal(with_lora, without)

    status = await training.status(outcome.training_id)
    assert status is not None and status.state == "completed" and status.lora_id == "mia_v1"


async def test_a_replay_returns_the_registered_lora_without_training(core: Core) -> None:
    training = core.training(lora_train_steps=10)
    first = await training.train(asked := request())
    seen: Progress = []
    again = await core.training().train(asked, recorder(seen))  # a fresh service: from disk
    assert again.replayed and again.lora_id == first.lora_id == "mia_v1" and seen == []
    other = await training.train(request())
    assert other.lora_id == "mia_v2" and other.training_id != first.training_id


async def test_a_stopped_training_resumes_from_its_checkpoint_as_if_never_stopped(
    core: Core, tmp_path: Path
) -> None:
    asked = request()
    first_run: Progress = []
    reached = asyncio.Event()

    def at_25(step: int) -> None:
        if step >= 25:
            reached.set()

    task = asyncio.create_task(core.training().train(asked, recorder(first_run, at_25)))
    await asyncio.wait_for(reached.wait(), WAIT)
    task.cancel()  # as the consume loop does on a revoke or at the end of its grace
    with pytest.raises(asyncio.CancelledError):
        await task
    folder = core.settings.temp_dir / "training" / asked.request_id
    checkpoints = list((core.settings.temp_dir / "training").glob("*/checkpoints/step-*"))
    assert len(checkpoints) == 1 and not folder.exists()
    stopped_at = int(checkpoints[0].name.removeprefix("step-"))
    assert 25 <= stopped_at < 60

    resumed: Progress = []
    outcome = await core.training().train(asked, recorder(resumed))
    assert resumed[0][0] == stopped_at + 1  # the first progress after the resume
    info = LoraRegistry(core.settings.lora_output_dir).get(outcome.lora_id)
    assert (info.training or {})["resumed_from_step"] == stopped_at

    straight = await core.training(lora_output_dir=tmp_path / "straight",
                                   temp_dir=tmp_path / "temp2").train(asked)
    straight_file = tmp_path / "straight" / f"{straight.lora_id}.safetensors"
    a, b = load_file(str(info.path)), load_file(str(straight_file))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


async def test_image_requests_run_between_chunks_of_a_training(core: Core) -> None:
    training = core.training(lora_train_steps=100, lora_checkpoint_every=10)
    started = asyncio.Event()
    seen: Progress = []
    task = asyncio.create_task(training.train(request(), recorder(seen,
                                                                   lambda _: started.set())))
    await asyncio.wait_for(started.wait(), WAIT)
    prompt, _ = await asyncio.wait_for(image_of(core, "a lighthouse"), WAIT)
    assert prompt == "a lighthouse"
    assert not task.done(), "the image waited for the whole training"
    step_when_image_done = seen[-1][0]
    outcome = await asyncio.wait_for(task, WAIT)
    assert step_when_image_done < 100 and outcome.lora_id == "mia_v1"


async def test_an_http_training_left_unfinished_is_resumed_at_start_up(core: Core) -> None:
    first = core.training()
    status = await first.submit(asked := request())
    assert status.state in ("queued", "training") and status.estimated_time_minutes
    await first.close()  # the engine stops: checkpointed, not finished
    stopped = await first.status(status.training_id)
    assert stopped is not None and stopped.state == "queued"

    restarted = core.training()
    assert await restarted.resume_pending() == [status.training_id]
    done = await asyncio.wait_for(restarted.wait(status.training_id), WAIT)
    assert done is not None and done.state == "completed" and done.lora_id == "mia_v1"
    assert done.request_id == asked.request_id


# ------------------------------------------------------------ state that does not grow
DAY = 24 * 3600.0


def leave_folder(core: Core, request_id: str, origin: Origin, *, age: float = 0.0,
                 complete: bool = True) -> Path:
    """A training folder as an earlier run (or another instance's request) left it,
    last changed ``age`` seconds ago; without ``spec.json`` unless ``complete``."""
    limits = TrainingLimits()
    images = [check_image(d, f"images.{i}", limits) for i, d in enumerate(photos(5))]
    spec = TrainingSpec(training_id_for("mia", request_id), request_id, None, "mia", "zqx",
                        "a photo of zqx", 4, 1e-3, 64, 1, origin,
                        tuple(image.sha256 for image in images))
    folder = TrainingFolder(core.settings.temp_dir / "training" / spec.training_id)
    folder.write_inputs(spec, images)
    if not complete:
        (folder.path / "spec.json").unlink()
    aged(folder.path, age)
    return folder.path


def aged(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    for item in [*path.rglob("*"), path]:
        os.utime(item, (then, then))


def test_statuses_of_trainings_not_running_expire_and_are_bounded() -> None:
    now = [0.0]
    running = {"run"}
    board = StatusBoard(lambda training_id: training_id in running, ttl=100.0,
                        max_entries=3, clock=lambda: now[0])

    def status(training_id: str, state: State = "completed") -> TrainingStatus:
        return TrainingStatus(training_id, "r", "mia", "zqx", state, 1, 1)

    board.put(status("run", "training"))
    board.put(status("a"))
    now[0] = 50.0
    board.put(status("b", "failed"))
    assert board.get("a") is not None and board.get("run") is not None
    now[0] = 120.0  # "a" and "run" untouched for 120 s, "b" for 70 s
    assert board.get("a") is None and board.get("b") is not None
    assert board.get("run") is not None, "a running training's status is never dropped"
    for name in ("c", "d", "e"):
        board.put(status(name))  # beyond 3 entries: the least recently touched go first
    assert [n for n in ("run", "b", "c", "d", "e") if board.get(n)] == ["run", "d", "e"]
    assert len(board) == 3


async def test_locks_do_not_outlive_their_requests(core: Core) -> None:
    training = core.training(lora_train_steps=4)
    outcome = await training.train(asked := request())
    await training.train(asked)  # a replay
    with pytest.raises(InvalidRequestError):
        await training.train(request(images=[InlineImage(filename="x", data=b"text")] * 5))
    assert len(training._locks) == 0  # what would grow with every request
    assert (await training.status(outcome.training_id)) is not None


async def test_orphaned_folders_are_removed_at_start_up_and_young_ones_resume(core: Core
                                                                             ) -> None:
    old_kafka = leave_folder(core, "old-kafka", "kafka", age=2 * DAY)
    old_http = leave_folder(core, "old-http", "http", age=2 * DAY)
    young_kafka = leave_folder(core, "young-kafka", "kafka", age=DAY / 2)
    young_http = leave_folder(core, "young-http", "http", age=DAY / 2)
    incomplete = leave_folder(core, "cut-short", "kafka", complete=False)

    training = core.training()
    assert await training.resume_pending() == [young_http.name]
    assert not old_kafka.exists() and not old_http.exists() and not incomplete.exists()
    assert young_kafka.exists()  # its request may still be redelivered here
    queued = await training.status(young_kafka.name)
    assert queued is not None and queued.state == "queued"
    assert await training.status(old_kafka.name) is None
    done = await asyncio.wait_for(training.wait(young_http.name), WAIT)
    assert done is not None and done.state == "completed"


async def test_idle_folders_are_removed_later_but_never_a_running_trainings(core: Core
                                                                            ) -> None:
    training = core.training(lora_train_steps=400, lora_checkpoint_every=10)
    await training.resume_pending()
    started = await training.submit(request())
    running = core.settings.temp_dir / "training" / started.training_id
    aged(running, 2 * DAY)
    orphan = leave_folder(core, "moved-away", "kafka", age=2 * DAY)
    young = leave_folder(core, "retried-soon", "kafka", age=60)
    assert await training.remove_orphans() == [orphan.name]
    assert running.exists() and young.exists() and not orphan.exists()
    await training.close()
