"""The GPU worker on the tiny development model (CPU): determinism, batching, LoRA
switching, progress, out-of-memory recovery, exclusive calls, placement (priority, start,
deadline), cancellation of a running job, stop."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from core.image import GpuWorker, ImageJob, LoadedModel, build_dev_model, load_pipeline
from core.image.devmodel import make_dev_lora
from core.image.worker import GpuOutOfMemoryError
from core.lora import LoraInfo, LoraLoadError, LoraRegistry
from core.lora.adapters import IncompatibleLoraError
from core.metrics import EngineMetrics
from core.scheduling import Placement, Priority
from schemas.errors import (
    ErrorCode,
    InternalError,
    InvalidRequestError,
    OutOfMemoryError,
    RequestExpiredError,
)

WAIT = 30.0  # seconds; a generous bound for any future, never a sleep


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_dev_model(tmp_path_factory.mktemp("model") / "flux-dev", seed=0)


@pytest.fixture(scope="module")
def loras(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, LoraInfo]:
    registry = LoraRegistry(tmp_path_factory.mktemp("loras"))
    made = tmp_path_factory.mktemp("made")
    infos = {}
    for index, name in enumerate(("sarah_v1", "emma.v2", "zoe")):
        weights = make_dev_lora(model_dir, made / f"{name}.safetensors", seed=index + 1)
        infos[name] = registry.register(name, weights, trigger_word=f"tok{index}",
                                        base_model="flux-tiny-dev")
    return infos


@pytest.fixture
def model(model_dir: Path) -> LoadedModel:
    return load_pipeline(model_dir, device="cpu", use_fp16=False, memory_mode="none",
                         attention_backend="native", compile_transformer=False)


@pytest.fixture
def metrics() -> EngineMetrics:
    return EngineMetrics(CollectorRegistry())


MakeWorker = Callable[..., GpuWorker]


@pytest.fixture
def make_worker(model: LoadedModel, metrics: EngineMetrics) -> Iterator[MakeWorker]:
    workers: list[GpuWorker] = []

    def make(**overrides: Any) -> GpuWorker:
        options: dict[str, Any] = {
            "max_batch_size": 4, "batch_window_ms": 0, "lora_cache_size": 4,
            "vae_tiling_threshold": 1536, "max_sequence_length": 32, "metrics": metrics,
        }
        options.update(overrides)
        worker = GpuWorker(model, **options)
        worker.start()
        workers.append(worker)
        return worker

    yield make
    for worker in workers:
        worker.stop(timeout=WAIT)


@pytest.fixture
async def worker(make_worker: MakeWorker) -> AsyncIterator[GpuWorker]:
    yield make_worker()


def job(seed: int = 1, **changes: Any) -> ImageJob:
    base = ImageJob(prompt="a photo of a woman", negative_prompt=None, width=64, height=64,
                    steps=4, guidance=3.5, true_cfg_scale=1.0, seed=seed, lora=None)
    return replace(base, **changes)


def pixels(image: Any) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def sample(metrics: EngineMetrics, name: str) -> float:
    return metrics.registry.get_sample_value(name) or 0.0


class Gate:
    """Holds the worker thread inside an exclusive call until released, so that the
    jobs submitted meanwhile are all queued when it takes the next batch."""

    def __init__(self, worker: GpuWorker) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.future = worker.submit_exclusive(self._hold)
        assert self.entered.wait(WAIT)

    def _hold(self, _pipeline: Any) -> None:
        self.entered.set()
        assert self.release.wait(WAIT)

    def open(self) -> None:
        self.release.set()
        self.future.result(WAIT)


async def test_same_seed_same_pixels_different_seed_differs(worker: GpuWorker) -> None:
    first = await worker.generate(job(seed=7))
    again = await worker.generate(job(seed=7))
    other = await worker.generate(job(seed=8))
    assert first.size == (64, 64) and first.mode == "RGB"
    assert np.array_equal(pixels(first), pixels(again))
    assert not np.array_equal(pixels(first), pixels(other))


async def test_compatible_jobs_run_as_one_batch_close_to_solo(
    make_worker: MakeWorker, metrics: EngineMetrics
) -> None:
    worker = make_worker(batch_window_ms=5000)  # a full batch never waits for the window
    gate = Gate(worker)
    futures = [worker.submit(job(seed=seed, prompt=f"portrait {seed}")) for seed in range(4)]
    gate.open()
    batched = [future.result(WAIT) for future in futures]
    assert sample(metrics, "engine_image_batch_size_count") == 1
    assert sample(metrics, "engine_image_batch_size_sum") == 4

    solo_worker = make_worker(max_batch_size=1)
    for seed, image in enumerate(batched):
        alone = await solo_worker.generate(job(seed=seed, prompt=f"portrait {seed}"))
        # batching changes float kernels: at most one level in 255, in a few pixels
        assert np.abs(pixels(image) - pixels(alone)).max() <= 1


async def test_a_cancelled_job_that_has_not_started_is_dropped(
    make_worker: MakeWorker, metrics: EngineMetrics
) -> None:
    worker = make_worker()
    gate = Gate(worker)
    task = asyncio.ensure_future(worker.generate(job(seed=1)))
    kept = worker.submit(job(seed=2, width=80))
    await asyncio.sleep(0)  # let the task queue its job (a yield, not a wait)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task  # by now the cancellation has reached the worker's queue
    gate.open()
    assert kept.result(WAIT).size == (80, 64)
    assert sample(metrics, "engine_image_batch_size_sum") == 1


async def test_incompatible_jobs_are_not_batched(
    make_worker: MakeWorker, metrics: EngineMetrics, loras: dict[str, LoraInfo]
) -> None:
    worker = make_worker(batch_window_ms=50)
    gate = Gate(worker)
    jobs = [
        job(seed=1), job(seed=2, width=80), job(seed=3), job(seed=4, width=80),
        job(seed=5, steps=3), job(seed=6, negative_prompt="blurry", true_cfg_scale=2.0),
        job(seed=7, lora=loras["sarah_v1"]), job(seed=8, guidance=5.0),
    ]
    futures = [worker.submit(item) for item in jobs]
    gate.open()
    sizes = [future.result(WAIT).size for future in futures]
    assert sizes[1] == (80, 64)
    assert sample(metrics, "engine_image_batch_size_sum") == 8
    assert sample(metrics, "engine_image_batch_size_count") == 6  # (1,3) (2,4) and 4 alone


async def test_lora_changes_output_and_no_lora_restores_base_exactly(
    worker: GpuWorker, loras: dict[str, LoraInfo], metrics: EngineMetrics
) -> None:
    base = pixels(await worker.generate(job()))
    with_lora = pixels(await worker.generate(job(lora=loras["sarah_v1"])))
    assert np.abs(with_lora - base).mean() > 1.0
    other = pixels(await worker.generate(job(lora=loras["emma.v2"])))
    assert not np.array_equal(other, with_lora)
    assert np.array_equal(pixels(await worker.generate(job())), base)
    assert np.array_equal(pixels(await worker.generate(job(lora=loras["sarah_v1"]))), with_lora)
    assert sample(metrics, "engine_lora_switch_seconds_count") == 4


async def test_lru_eviction_beyond_cache_size(
    make_worker: MakeWorker, loras: dict[str, LoraInfo], metrics: EngineMetrics
) -> None:
    worker = make_worker(lora_cache_size=2)
    first = pixels(await worker.generate(job(lora=loras["sarah_v1"])))
    await worker.generate(job(lora=loras["emma.v2"]))
    assert worker.loaded_loras == ["sarah_v1", "emma.v2"]
    await worker.generate(job(lora=loras["zoe"]))
    assert worker.loaded_loras == ["emma.v2", "zoe"]
    assert sample(metrics, "engine_lora_evictions_total") == 1
    again = pixels(await worker.generate(job(lora=loras["sarah_v1"])))
    assert worker.loaded_loras == ["zoe", "sarah_v1"]
    assert np.array_equal(again, first)  # reloaded from its file: the same adapter


async def test_changed_lora_file_fails_instead_of_running_the_base_model(
    worker: GpuWorker, loras: dict[str, LoraInfo], tmp_path: Path
) -> None:
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(loras["zoe"].path.read_bytes()[:-4] + b"\0\0\0\0")
    changed = replace(loras["zoe"], path=copy)
    with pytest.raises(LoraLoadError) as caught:
        await worker.generate(job(lora=changed))
    assert caught.value.code == ErrorCode.INTERNAL and "changed on disk" in caught.value.message
    await worker.generate(job())  # and the worker goes on


async def test_a_lora_for_layers_the_model_lacks_fails_before_loading(
    worker: GpuWorker, loras: dict[str, LoraInfo], tmp_path: Path
) -> None:
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    save_file({"transformer.nowhere.lora_A.weight": torch.ones(16, 3),
               "transformer.nowhere.lora_B.weight": torch.ones(3, 16)}, str(bad))
    from core.lora.registry import file_sha256

    info = replace(loras["zoe"], lora_id="bad", path=bad, sha256=file_sha256(bad))
    with pytest.raises(IncompatibleLoraError, match="no linear layer of this model") as caught:
        await worker.generate(job(lora=info))
    assert caught.value.code == ErrorCode.INVALID_REQUEST and caught.value.lora_id == "bad"
    assert worker.loaded_loras == []
    base = pixels(await worker.generate(job()))
    assert np.abs(pixels(await worker.generate(job(lora=loras["zoe"]))) - base).mean() > 1.0


async def test_progress_arrives_in_order_for_every_job_of_a_batch(
    make_worker: MakeWorker,
) -> None:
    worker = make_worker(batch_window_ms=5000, max_batch_size=2)
    seen: dict[int, list[tuple[int, int]]] = {1: [], 2: []}
    gate = Gate(worker)
    futures = [
        worker.submit(job(seed=seed, steps=5, progress=lambda s, t, k=seed: seen[k].append((s, t))))
        for seed in (1, 2)
    ]
    gate.open()
    for future in futures:
        future.result(WAIT)
    assert seen[1] == seen[2] == [(step, 5) for step in range(1, 6)]


async def test_out_of_memory_in_a_batch_is_retried_unbatched(
    make_worker: MakeWorker, metrics: EngineMetrics
) -> None:
    calls: list[int] = []

    def oom_when_batched(jobs: list[ImageJob]) -> None:
        calls.append(len(jobs))
        if len(jobs) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    worker = make_worker(batch_window_ms=5000, max_batch_size=3, oom_injector=oom_when_batched)
    gate = Gate(worker)
    futures = [worker.submit(job(seed=seed)) for seed in range(3)]
    gate.open()
    images = [future.result(WAIT) for future in futures]
    assert calls == [3, 1, 1, 1]
    assert sample(metrics, "engine_image_oom_total") == 1
    # the batch size histogram counts the calls that made images: three of one, not the
    # failed batch of three as well
    assert sample(metrics, "engine_image_batch_size_count") == 3
    assert sample(metrics, "engine_image_batch_size_sum") == 3
    solo = await make_worker().generate(job(seed=0))
    assert np.array_equal(pixels(images[0]), pixels(solo))  # the retry ran it alone


async def test_out_of_memory_alone_too_fails_and_the_worker_goes_on(
    make_worker: MakeWorker,
) -> None:
    def oom_for_huge(jobs: list[ImageJob]) -> None:
        if any(item.prompt == "huge" for item in jobs):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    worker = make_worker(oom_injector=oom_for_huge)
    with pytest.raises(OutOfMemoryError) as caught:
        await worker.generate(job(prompt="huge"))
    assert caught.value.code == ErrorCode.OUT_OF_MEMORY and caught.value.retryable
    assert "CUDA out of memory (injected)" in caught.value.message  # torch's text only
    assert caught.value.__cause__ is None
    assert (await worker.generate(job())).size == (64, 64)


class NeverFits:
    """An ``oom_injector`` for jobs whose prompt says "huge": like a real failed call, each
    attempt allocates a tensor (held only by its frame) before torch runs out of memory.
    Records every call's batch size and a weak reference to each tensor."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.tensors: list[weakref.ref[torch.Tensor]] = []

    def __call__(self, jobs: list[ImageJob]) -> None:
        if not any("huge" in item.prompt for item in jobs):
            return
        self.calls.append(len(jobs))
        latents = torch.zeros(len(jobs), 4096)
        self.tensors.append(weakref.ref(latents))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")

    def alive(self) -> int:
        gc.collect()
        return sum(ref() is not None for ref in self.tensors)


async def test_a_job_that_never_fits_costs_two_attempts_and_its_error_holds_no_tensor(
    make_worker: MakeWorker,
) -> None:
    never = NeverFits()
    worker = make_worker(oom_injector=never)
    with pytest.raises(GpuOutOfMemoryError) as caught:
        await worker.generate(job(prompt="a huge panorama"))
    error = caught.value  # held, as the consume loop holds it while it answers
    assert never.calls == [1, 1] and error.attempts == 2
    assert error.code == ErrorCode.OUT_OF_MEMORY and error.retryable
    assert "Tried to allocate 20.00 GiB" in error.message
    assert error.__cause__ is None and error.__context__ is None
    assert never.alive() == 0 and len(never.tensors) == 2
    assert (await worker.generate(job())).size == (64, 64)  # the next request runs normally
    assert never.calls == [1, 1]


async def test_a_batch_that_never_fits_gives_each_job_two_attempts_in_all(
    make_worker: MakeWorker, metrics: EngineMetrics
) -> None:
    never = NeverFits()
    worker = make_worker(batch_window_ms=5000, max_batch_size=3, oom_injector=never)
    gate = Gate(worker)
    futures = [worker.submit(job(seed=seed, prompt="huge")) for seed in range(3)]
    gate.open()
    errors = [future.exception(WAIT) for future in futures]
    assert never.calls == [3, 1, 1, 1]  # the batch, then each alone: two attempts per job
    assert all(isinstance(e, GpuOutOfMemoryError) and e.attempts == 2 for e in errors)
    assert sample(metrics, "engine_image_oom_total") == 4
    assert never.alive() == 0


async def test_run_exclusive_runs_in_the_worker_thread_between_jobs(
    make_worker: MakeWorker,
) -> None:
    worker = make_worker(max_batch_size=1)
    events: list[str] = []

    def exclusive(pipeline: Any) -> str:
        events.append("exclusive")
        assert threading.current_thread().name == "gpu-worker"
        return type(pipeline).__name__

    gate = Gate(worker)
    first = worker.submit(job(seed=1, progress=lambda s, t: events.append(f"a{s}")))
    middle = worker.submit_exclusive(exclusive)
    last = worker.submit(job(seed=2, progress=lambda s, t: events.append(f"b{s}")))
    gate.open()
    first.result(WAIT)
    last.result(WAIT)
    assert middle.result(WAIT) == "FluxPipeline"
    assert events == ["a1", "a2", "a3", "a4", "exclusive", "b1", "b2", "b3", "b4"]


async def test_run_exclusive_errors_reach_the_caller(worker: GpuWorker) -> None:
    def broken(_pipeline: Any) -> None:
        raise KeyError("checkpoint")

    with pytest.raises(KeyError):
        await worker.run_exclusive(broken)
    assert (await worker.generate(job())).size == (64, 64)


async def test_vae_tiling_follows_the_threshold(make_worker: MakeWorker, model: LoadedModel) -> None:
    worker = make_worker(vae_tiling_threshold=64)
    await worker.generate(job(width=80))
    assert model.pipeline.vae.use_tiling
    await worker.generate(job())
    assert not model.pipeline.vae.use_tiling


async def test_negative_prompt_acts_with_true_cfg(worker: GpuWorker) -> None:
    plain = pixels(await worker.generate(job()))
    negative = job(negative_prompt="blurry, dark", true_cfg_scale=4.0)
    guided = pixels(await worker.generate(negative))
    assert not np.array_equal(plain, guided)
    assert np.array_equal(pixels(await worker.generate(negative)), guided)


async def test_cancelling_a_running_generate_stops_it_at_its_next_step(
    worker: GpuWorker,
) -> None:
    at_step_1, cancelled = threading.Event(), threading.Event()
    steps: list[int] = []

    def progress(step: int, _total: int) -> None:
        steps.append(step)
        if step == 1:
            at_step_1.set()
            cancelled.wait(WAIT)  # hold the worker until the cancellation has landed

    task = asyncio.ensure_future(worker.generate(job(steps=20, progress=progress)))
    assert await asyncio.to_thread(at_step_1.wait, WAIT)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    steps_when_cancelled = len(steps)
    cancelled.set()
    assert (await worker.generate(job(seed=2))).size == (64, 64)  # the worker goes on
    assert len(steps) - steps_when_cancelled <= 1  # stopped within one step, not at 20


async def test_a_job_cancelled_in_a_running_batch_leaves_the_others_alone(
    make_worker: MakeWorker,
) -> None:
    worker = make_worker(batch_window_ms=5000, max_batch_size=2)
    at_step_1, cancelled = threading.Event(), threading.Event()
    steps: list[int] = []

    def progress(step: int, _total: int) -> None:
        steps.append(step)
        if step == 1:
            at_step_1.set()
            cancelled.wait(WAIT)

    gate = Gate(worker)
    task = asyncio.ensure_future(worker.generate(job(seed=1, progress=progress)))
    await asyncio.sleep(0)  # let the task queue its job (a yield, not a wait)
    kept = worker.submit(job(seed=2))
    gate.open()
    assert await asyncio.to_thread(at_step_1.wait, WAIT)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    cancelled.set()
    assert (await asyncio.wrap_future(kept)).size == (64, 64)
    assert steps == [1]  # the withdrawn job's progress stopped; its image was discarded


async def test_placement_start_is_reported_once_per_job_in_the_worker_thread(
    make_worker: MakeWorker,
) -> None:
    started: list[tuple[str, str]] = []

    def placement(name: str) -> Placement:
        return Placement(owner=name, on_start=lambda: started.append(
            (name, threading.current_thread().name)))

    def oom_when_batched(jobs: list[ImageJob]) -> None:
        if len(jobs) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    worker = make_worker(batch_window_ms=5000, max_batch_size=3, oom_injector=oom_when_batched)
    gate = Gate(worker)
    futures = [worker.submit(job(seed=seed), placement(f"job{seed}")) for seed in range(3)]
    exclusive = worker.submit_exclusive(lambda _pipeline: started.append(("fn", "")),
                                        placement("call"))
    gate.open()
    for future in futures:
        future.result(WAIT)  # batched, out of memory, retried alone: still started once
    exclusive.result(WAIT)
    assert sorted(started) == sorted([(f"job{seed}", "gpu-worker") for seed in range(3)]
                                     + [("call", "gpu-worker"), ("fn", "")])
    assert started.index(("call", "gpu-worker")) < started.index(("fn", ""))


async def test_a_job_past_its_deadline_never_reaches_the_pipeline(
    make_worker: MakeWorker,
) -> None:
    calls: list[int] = []
    worker = make_worker(oom_injector=lambda jobs: calls.append(len(jobs)))
    late = Placement(deadline=time.time() - 1, on_start=lambda: calls.append(-1))
    with pytest.raises(RequestExpiredError) as caught:
        await worker.generate(job(), late)
    assert caught.value.code == ErrorCode.EXPIRED
    assert calls == []
    await worker.generate(job(), Placement(deadline=time.time() + 3600))
    assert calls == [1]


async def test_interactive_jobs_go_before_background_ones_queued_earlier(
    make_worker: MakeWorker, metrics: EngineMetrics
) -> None:
    worker = make_worker()  # no window: the batch is what is queued when it is taken
    order: list[str] = []
    gate = Gate(worker)
    background = worker.submit(job(seed=1, progress=lambda s, t: order.append(f"bg{s}")),
                               Placement(priority=Priority.BACKGROUND, owner="replay"))
    interactive = worker.submit(job(seed=2, progress=lambda s, t: order.append(f"it{s}")),
                                Placement(owner="chat"))
    assert worker.depth() == {Priority.INTERACTIVE: 1, Priority.BACKGROUND: 1}
    gate.open()
    background.result(WAIT)
    interactive.result(WAIT)
    assert order == ["it1", "it2", "it3", "it4", "bg1", "bg2", "bg3", "bg4"]
    assert sample(metrics, "engine_image_batch_size_count") == 2  # compatible, not batched


async def test_stop_finishes_queued_jobs_then_refuses_new_ones(make_worker: MakeWorker) -> None:
    worker = make_worker()
    futures = [worker.submit(job(seed=seed, width=64 + 16 * seed)) for seed in range(3)]
    await asyncio.to_thread(worker.stop, WAIT)
    assert [future.result(0).size[0] for future in futures] == [64, 80, 96]
    with pytest.raises(InternalError, match="stopped"):
        worker.submit(job())


def test_jobs_queued_on_a_worker_never_started_fail_on_stop(model: LoadedModel) -> None:
    worker = GpuWorker(model, max_batch_size=1, batch_window_ms=0, lora_cache_size=1,
                       vae_tiling_threshold=1536, max_sequence_length=32)
    future = worker.submit(job())
    worker.stop()
    with pytest.raises(InternalError, match="not run"):
        future.result(0)


def test_sizes_the_pipeline_would_round_are_refused(model: LoadedModel) -> None:
    worker = GpuWorker(model, max_batch_size=1, batch_window_ms=0, lora_cache_size=1,
                       vae_tiling_threshold=1536, max_sequence_length=32)
    with pytest.raises(InvalidRequestError) as caught:
        worker.submit(job(width=72))
    assert caught.value.field == "width"


def test_a_job_of_more_images_than_max_batch_size_is_refused(model: LoadedModel) -> None:
    # a job's images are one batch: more than MAX_BATCH_SIZE would run as an oversized
    # batch (and be retried alone, as oversized, after running out of memory)
    worker = GpuWorker(model, max_batch_size=2, batch_window_ms=0, lora_cache_size=1,
                       vae_tiling_threshold=1536, max_sequence_length=32)
    with pytest.raises(InvalidRequestError) as caught:
        worker.enqueue(job(count=3))
    assert caught.value.field == "num_images" and "MAX_BATCH_SIZE=2" in caught.value.message
    assert worker.depth() == {priority: 0 for priority in Priority}
    worker.stop()


def test_settings_are_checked_at_construction(model: LoadedModel) -> None:
    with pytest.raises(ValueError, match="FLUX_MAX_SEQUENCE_LENGTH"):
        GpuWorker(model, max_batch_size=1, batch_window_ms=0, lora_cache_size=1,
                  vae_tiling_threshold=1536, max_sequence_length=513)
    with pytest.raises(ValueError, match="MAX_BATCH_SIZE"):
        GpuWorker(model, max_batch_size=0, batch_window_ms=0, lora_cache_size=1,
                  vae_tiling_threshold=1536, max_sequence_length=32)
