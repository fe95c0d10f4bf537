"""Runs one training on the GPU worker, a chunk at a time, checkpointing between chunks.

The worker is held only for one exclusive call at a time: encoding the data once, then one
chunk of up to LORA_CHECKPOINT_EVERY steps per call. Image jobs queued meanwhile run
between two calls, so a long training never starves generation. After each chunk the
state is checkpointed (off the event loop); a run starts from the newest checkpoint, so a
training that crashed or was stopped resumes where its last checkpoint was.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from core.image.worker import GpuWorker
from core.scheduling.placement import Placement
from core.training.checkpoint import TrainingFolder
from core.training.encode import TrainingCache, encode_training_data
from core.training.estimate import StepTimes
from core.training.pixels import to_pixels
from core.training.progress import ProgressFanout
from core.training.spec import TrainingSpec
from core.training.stopping import StopSignal
from core.training.trainer import ChunkPlan, ChunkResult, TrainState, run_chunk

__all__ = ["RunResult", "TrainingInterrupted", "TrainingRunner"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
_PROBE_FILE = "probe.json"


class TrainingInterrupted(Exception):
    """The training was stopped (the engine is stopping) at a checkpoint; it resumes
    from there when its request comes again. Not an engine error: nothing is published."""


@dataclass(frozen=True)
class RunResult:
    """The final state, the probe loss before training and after it, and the step the
    run started from (0, or the checkpoint it resumed)."""

    state: TrainState
    probe_start: float | None
    probe_end: float | None
    resumed_from: int
    seconds: float


class TrainingRunner:
    """Trains on ``worker``'s pipeline; measured step times go to ``times``."""

    def __init__(self, worker: GpuWorker, times: StepTimes, *, checkpoint_every: int,
                 max_sequence_length: int) -> None:
        if checkpoint_every < 1:
            raise ValueError(f"LORA_CHECKPOINT_EVERY must be >= 1, got {checkpoint_every}")
        self._worker = worker
        self._times = times
        self._every = checkpoint_every
        self._max_sequence_length = max_sequence_length

    async def run(self, spec: TrainingSpec, folder: TrainingFolder, progress: ProgressFanout,
                  stop: StopSignal,
                  checkpointed: Callable[[int], Awaitable[None]] | None = None) -> RunResult:
        """Train ``spec`` to its last step. Raises :class:`TrainingInterrupted` when
        ``stop`` is set first (after checkpointing the step reached); the worker's errors
        (:class:`~schemas.errors.OutOfMemoryError`, …) pass through, the last checkpoint
        staying on disk. ``checkpointed(step)`` is awaited after each checkpoint is on
        disk (the shared store's copy)."""
        started = time.perf_counter()
        cache = await self._cache(spec, folder, stop)
        state = await asyncio.to_thread(folder.latest_checkpoint)
        resumed_from = state.step if state is not None else 0
        if state is not None:
            logger.info("request_id=%s training %s resumes from step %d of %d",
                        spec.request_id, spec.training_id, state.step, spec.steps)
        probes: dict[str, float] = await asyncio.to_thread(_read_probes, folder)
        while state is None or state.step < spec.steps:
            if stop.is_set():
                raise TrainingInterrupted(f"training {spec.training_id} stopped at step "
                                          f"{state.step if state else 0}")
            step = state.step if state is not None else 0
            end = min(spec.steps, (step // self._every + 1) * self._every)
            plan = ChunkPlan(
                adapter_name=spec.adapter_name, seed=spec.seed, end_step=end,
                learning_rate=spec.learning_rate, batch_size=spec.batch_size, state=state,
                probe_before=state is None, probe_after=end >= spec.steps,
            )

            def chunk(pipeline: Any, plan: ChunkPlan = plan) -> ChunkResult:
                return run_chunk(pipeline, cache, plan, on_step=progress.step, stop=stop)

            result = await self._exclusive(chunk, spec, stop)
            state = result.state
            await asyncio.to_thread(folder.save_checkpoint, state)
            await asyncio.to_thread(self._note, spec, folder, result, probes)
            if checkpointed is not None:
                await checkpointed(state.step)
            logger.info("request_id=%s training %s checkpointed at step %d of %d (loss %.4f)",
                        spec.request_id, spec.training_id, state.step, spec.steps,
                        state.loss if state.loss is not None else float("nan"))
        return RunResult(state, probes.get("start"), probes.get("end"), resumed_from,
                         time.perf_counter() - started)

    async def _cache(self, spec: TrainingSpec, folder: TrainingFolder,
                     stop: StopSignal) -> TrainingCache:
        cache = await asyncio.to_thread(folder.read_cache)
        if cache is not None and cache.image_count == spec.image_count:
            return cache
        images = await asyncio.to_thread(folder.read_images, spec)
        pixels = await asyncio.to_thread(to_pixels, images, spec.resolution)
        cache = await self._exclusive(
            lambda pipeline: encode_training_data(
                pipeline, pixels, spec.caption, max_sequence_length=self._max_sequence_length),
            spec, stop)
        await asyncio.to_thread(folder.write_cache, cache)
        return cache

    async def _exclusive(self, fn: Callable[[Any], T], spec: TrainingSpec,
                         stop: StopSignal) -> T:
        """``fn`` in the worker thread, the training taking turns with conversations as its
        own owner (so it yields to them between chunks). ``stop`` set before the call's turn
        comes drops it (:class:`TrainingInterrupted` at once, the last checkpoint standing);
        set later, the call stops at its next step. If this task is cancelled meanwhile (the
        service stops trainings through ``stop`` instead, which checkpoints), a call not yet
        started is dropped and a running one is told to stop and awaited, so the pipeline is
        restored before this returns; its steps since the last checkpoint are lost."""
        future = self._worker.submit_exclusive(
            fn, Placement(owner=f"training:{spec.training_id}"))
        result = asyncio.wrap_future(future)
        stopped = asyncio.ensure_future(stop.wait_async())
        try:
            first: set[asyncio.Future[Any]] = {result, stopped}
            await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
            if not result.done() and future.cancel():  # told to stop before its turn came
                raise TrainingInterrupted(f"training {spec.training_id} stopped while "
                                          "waiting for the GPU")
            return await asyncio.shield(result)
        except asyncio.CancelledError:
            if not future.cancel():
                stop.set()
                await asyncio.wait({result})
            raise
        finally:
            stopped.cancel()

    def _note(self, spec: TrainingSpec, folder: TrainingFolder, result: ChunkResult,
              probes: dict[str, float]) -> None:
        if result.seconds_per_step is not None:
            self._times.record(spec.resolution, spec.batch_size, result.seconds_per_step)
        changed = False
        for key, value in (("start", result.probe_before), ("end", result.probe_after)):
            if value is not None:
                probes[key] = value
                changed = True
        if changed:
            _write_probes(folder, probes)


def _read_probes(folder: TrainingFolder) -> dict[str, float]:
    try:
        data = json.loads((folder.path / _PROBE_FILE).read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return {str(k): float(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _write_probes(folder: TrainingFolder, probes: dict[str, float]) -> None:
    (folder.path / _PROBE_FILE).write_text(json.dumps(probes), "utf-8")
