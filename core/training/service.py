"""The one core entry for LoRA training, used by Kafka and HTTP alike.

request → id (``{character_id}_{sha8(request_id)}``) → already registered? (a replay: the
result at once) → already running here? (joined) → inputs on disk from an earlier attempt?
(resumed, nothing fetched again) → else checked in memory (:class:`Intake`) and written →
trained a chunk at a time (:class:`TrainingRunner`) → registered as ``{character_id}_v{n}``
→ validation image through the image service → folder removed.

Trainings run one at a time per engine (the others wait as ``queued``). Kafka waits for the
result (:meth:`TrainingService.train`); HTTP starts it in the background
(:meth:`TrainingService.submit`) and polls :meth:`TrainingService.status`. At start-up
:meth:`TrainingService.resume_pending` resumes HTTP-started trainings left unfinished by a
crash (Kafka ones resume when their request is redelivered).
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from dataclasses import dataclass

import torch

from core.image.service import ImageService
from core.lora.registry import LoraInfo, LoraRegistry
from core.training.checkpoint import TrainingFolder, TrainingStore
from core.training.estimate import StepTimes
from core.training.intake import Intake, spec_identity
from core.training.progress import ProgressFanout, ProgressListener
from core.training.register import find_registered, register_lora
from core.training.runner import RunResult, TrainingInterrupted, TrainingRunner
from core.training.spec import Origin, TrainingLimits, TrainingSpec
from core.training.status import StatusBoard, TrainingStatus
from schemas.errors import EngineError, InternalError
from schemas.events import ImageRequested, LoraTrainingRequested, utc_now_iso

__all__ = ["TrainingOutcome", "TrainingService"]

_TRAINING_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingOutcome:
    """A finished training: what ``generation.completed`` (kind ``lora``) carries.
    ``replayed`` when it was found registered rather than trained now."""

    training_id: str
    request_id: str
    conversation_id: str | None
    character_id: str
    trigger_word: str
    lora_id: str
    validation_image_url: str | None
    replayed: bool = False


@dataclass(eq=False)
class _Run:
    spec: TrainingSpec
    progress: ProgressFanout
    stop: threading.Event
    task: asyncio.Task[TrainingOutcome] | None = None


class TrainingService:
    """Trainings of this engine; see the module docstring. ``lora_dtype`` is the dtype of
    the saved LoRA weights (the model's: bf16 on CUDA, fp32 on a CPU)."""

    def __init__(
        self, runner: TrainingRunner, intake: Intake, store: TrainingStore,
        registry: LoraRegistry, images: ImageService, times: StepTimes, *,
        base_model: str, lora_dtype: torch.dtype, progress_interval: float,
    ) -> None:
        self._runner = runner
        self._intake = intake
        self._store = store
        self._registry = registry
        self._images = images
        self._times = times
        self._base_model = base_model
        self._lora_dtype = lora_dtype
        self._interval = progress_interval
        self._board = StatusBoard()
        self._runs: dict[str, _Run] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._gpu = asyncio.Semaphore(1)
        self._stopping = False

    @property
    def limits(self) -> TrainingLimits:
        """What requests are checked against (for readers of uploads: stop early)."""
        return self._intake.limits

    # ------------------------------------------------------------------ entries
    async def train(self, request: LoraTrainingRequested,
                    progress: ProgressListener | None = None) -> TrainingOutcome:
        """Train (or resume, or find) the LoRA ``request`` asks for and return it;
        ``progress(step, total, loss)`` hears the steps. Raises
        :class:`~schemas.errors.InvalidRequestError` naming the field (nothing written),
        :class:`~schemas.errors.UpstreamUnavailableError` (an image URL, retryable),
        :class:`~schemas.errors.OutOfMemoryError` (retryable: the checkpoint stays),
        :class:`~schemas.errors.InternalError`, or :class:`TrainingInterrupted` when the
        engine stops first. Cancelling the caller stops the training at its next step,
        checkpointed."""
        begun = await self._begin(request, "kafka")
        if isinstance(begun, TrainingOutcome):
            return begun
        if progress is not None:
            begun.progress.add(progress)
        assert begun.task is not None
        try:
            return await asyncio.shield(begun.task)
        except asyncio.CancelledError:
            if not begun.task.done() and begun.spec.origin == "kafka":
                begun.stop.set()
                await asyncio.wait({begun.task})
            raise
        finally:
            if progress is not None:
                begun.progress.remove(progress)

    async def submit(self, request: LoraTrainingRequested) -> TrainingStatus:
        """Check ``request`` and start its training in the background (or find it running
        or registered); return its status. Raises like :meth:`train` before anything
        starts."""
        begun = await self._begin(request, "http")
        training_id = begun.training_id if isinstance(begun, TrainingOutcome) else (
            begun.spec.training_id)
        status = await self.status(training_id)
        assert status is not None
        return status

    async def status(self, training_id: str) -> TrainingStatus | None:
        """The status of ``training_id``: from memory, else the registry (completed), else
        its folder (queued: waiting to resume); None when unknown (or not a training id
        at all: a path trick never reaches the filesystem)."""
        if not _TRAINING_ID.fullmatch(training_id) or ".." in training_id:
            return None
        known = self._board.get(training_id)
        if known is not None:
            return known
        info = await asyncio.to_thread(find_registered, self._registry, training_id)
        if info is not None:
            return self._board.put(_completed_status(info))
        folder = self._store.folder(training_id)
        spec = await asyncio.to_thread(folder.read_spec)
        if spec is None:
            return None
        return self._queued(spec, await asyncio.to_thread(folder.latest_step))

    async def wait(self, training_id: str) -> TrainingStatus | None:
        """Wait until the training running here as ``training_id`` ends (at once when none
        does) and return its status; its errors are in the status, not raised."""
        run = self._runs.get(training_id)
        if run is not None and run.task is not None:
            await asyncio.wait({run.task})
        return await self.status(training_id)

    async def resume_pending(self) -> list[str]:
        """At start-up: resume HTTP-started trainings found on disk (ids returned), drop
        folders of trainings already registered, list Kafka ones as queued."""
        resumed: list[str] = []
        for spec in await asyncio.to_thread(self._store.specs):
            folder = self._store.folder(spec.training_id)
            if await asyncio.to_thread(find_registered, self._registry, spec.training_id):
                await asyncio.to_thread(folder.remove)
            elif spec.origin == "http":
                logger.info("request_id=%s resuming training %s left by a previous run",
                            spec.request_id, spec.training_id)
                self._start(spec, await asyncio.to_thread(folder.latest_step))
                resumed.append(spec.training_id)
            else:
                self._queued(spec, await asyncio.to_thread(folder.latest_step))
        return resumed

    def request_stop(self) -> None:
        """Stop every training at its next step (checkpointed) and take no new ones."""
        self._stopping = True
        for run in list(self._runs.values()):
            run.stop.set()

    async def close(self) -> None:
        """:meth:`request_stop`, then wait until every training has checkpointed."""
        self.request_stop()
        tasks = [run.task for run in list(self._runs.values()) if run.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)

    def estimate_minutes(self, spec: TrainingSpec, done: int = 0) -> int:
        """Minutes the rest of ``spec`` should take, from measured step times."""
        return self._times.estimate_minutes(spec.steps - done, spec.resolution,
                                            spec.batch_size)

    # ------------------------------------------------------------- starting
    async def _begin(self, request: LoraTrainingRequested, origin: Origin
                     ) -> _Run | TrainingOutcome:
        if self._stopping:
            raise TrainingInterrupted("the engine is stopping")
        training_id = spec_identity(request)
        lock = self._locks.setdefault(training_id, asyncio.Lock())
        async with lock:
            running = self._runs.get(training_id)
            if running is not None:
                return running
            info = await asyncio.to_thread(find_registered, self._registry, training_id)
            folder = self._store.folder(training_id)
            if info is not None:
                logger.info("request_id=%s training %s was done before: LoRA %s",
                            request.request_id, training_id, info.lora_id)
                await asyncio.to_thread(folder.remove)
                self._board.put(_completed_status(info))
                return _outcome(info, request.conversation_id, replayed=True)
            spec = await asyncio.to_thread(folder.read_spec)
            if spec is not None and spec.request_id == request.request_id:
                logger.info("request_id=%s training %s found on disk", request.request_id,
                            training_id)
            else:
                spec = await self._take_in(request, origin, folder)
            return self._start(spec, await asyncio.to_thread(folder.latest_step))

    async def _take_in(self, request: LoraTrainingRequested, origin: Origin,
                       folder: TrainingFolder) -> TrainingSpec:
        spec, images = await self._intake.take(request, origin)  # raises before writing
        try:
            await asyncio.to_thread(folder.remove)  # another request's leftovers, if any
            await asyncio.to_thread(folder.write_inputs, spec, images)
        except OSError as exc:
            await asyncio.to_thread(folder.remove)
            raise InternalError(f"training inputs could not be written: {exc}") from exc
        logger.info("request_id=%s training %s accepted: %d images, %d steps, lr %g, %dpx",
                    spec.request_id, spec.training_id, spec.image_count, spec.steps,
                    spec.learning_rate, spec.resolution)
        return spec

    def _start(self, spec: TrainingSpec, done: int) -> _Run:
        training_id = spec.training_id

        def report(step: int, loss: float | None) -> None:
            self._board.update(training_id, state="training", step=step, loss=loss,
                               estimated_time_minutes=self.estimate_minutes(spec, step))

        run = _Run(spec, ProgressFanout(spec.steps, self._interval, report), threading.Event())
        self._queued(spec, done)
        run.task = asyncio.create_task(self._execute(run), name=f"training-{training_id}")
        self._runs[training_id] = run
        run.task.add_done_callback(lambda task: self._ended(run, task))
        return run

    def _ended(self, run: _Run, task: asyncio.Task[TrainingOutcome]) -> None:
        training_id = run.spec.training_id
        if self._runs.get(training_id) is run:
            del self._runs[training_id]
        lock = self._locks.get(training_id)
        if lock is not None and not lock.locked():
            del self._locks[training_id]
        if not task.cancelled():
            task.exception()  # retrieved: HTTP runs have nobody awaiting them

    # ------------------------------------------------------------- running
    async def _execute(self, run: _Run) -> TrainingOutcome:
        spec = run.spec
        folder = self._store.folder(spec.training_id)
        try:
            async with self._gpu:
                self._board.update(spec.training_id, state="training")
                result = await self._runner.run(spec, folder, run.progress, run.stop)
                return await self._finish(spec, folder, result)
        except (TrainingInterrupted, asyncio.CancelledError):
            self._board.update(spec.training_id, state="queued")
            logger.info("request_id=%s training %s stopped; it resumes from its checkpoint",
                        spec.request_id, spec.training_id)
            raise
        except EngineError as exc:
            await self._failed(spec, folder, exc)
            raise
        except Exception as exc:
            error = InternalError(f"training failed: {type(exc).__name__}: {exc}")
            await self._failed(spec, folder, error)
            raise error from exc
        finally:
            await run.progress.aclose()  # progress events precede the result

    async def _failed(self, spec: TrainingSpec, folder: TrainingFolder,
                      error: EngineError) -> None:
        logger.error("request_id=%s training %s failed: %s %s", spec.request_id,
                     spec.training_id, error.code, error, exc_info=error.code == "INTERNAL")
        self._board.update(spec.training_id, state="failed", error_code=str(error.code),
                           error=error.message, retryable=error.retryable)
        if not error.retryable:  # a retry would fail alike: leave nothing behind
            await asyncio.to_thread(folder.remove)

    async def _finish(self, spec: TrainingSpec, folder: TrainingFolder,
                      result: RunResult) -> TrainingOutcome:
        training = {
            "training_id": spec.training_id, "request_id": spec.request_id,
            "character_id": spec.character_id, "caption": spec.caption, "steps": spec.steps,
            "learning_rate": spec.learning_rate, "resolution": spec.resolution,
            "batch_size": spec.batch_size, "images": spec.image_count,
            "image_sha256": list(spec.image_sha256), "final_loss": result.state.loss,
            "probe_loss_start": result.probe_start, "probe_loss_end": result.probe_end,
            "resumed_from_step": result.resumed_from, "completed_at": utc_now_iso(),
        }
        info = await asyncio.to_thread(
            register_lora, self._registry, folder, spec, result.state.weights,
            dtype=self._lora_dtype, base_model=self._base_model, training=training)
        url = await self._validation_image(spec, info.lora_id)
        if url is not None:
            training["validation_image_url"] = url
            info = await asyncio.to_thread(
                self._registry.register, info.lora_id, info.path,
                trigger_word=spec.trigger_word, base_model=self._base_model,
                training=training, replace=True)
        await asyncio.to_thread(folder.remove)
        self._board.put(_completed_status(info))
        logger.info("request_id=%s training %s completed: LoRA %s (probe loss %s → %s)",
                    spec.request_id, spec.training_id, info.lora_id,
                    _fmt(result.probe_start), _fmt(result.probe_end))
        return _outcome(info, spec.conversation_id, replayed=False)

    async def _validation_image(self, spec: TrainingSpec, lora_id: str) -> str | None:
        request = ImageRequested(
            request_id=f"{spec.training_id}-validation",
            conversation_id=spec.conversation_id or spec.character_id,
            character_id=spec.character_id, prompt=spec.caption, character_lora_id=lora_id,
            width=spec.resolution, height=spec.resolution, seed=0, optimize_prompt=False,
        )
        try:
            return (await self._images.generate(request)).url
        except EngineError as exc:  # the LoRA is registered and usable; say so and go on
            logger.warning("request_id=%s validation image of %s failed: %s %s",
                           spec.request_id, lora_id, exc.code, exc)
            return None

    def _queued(self, spec: TrainingSpec, done: int) -> TrainingStatus:
        return self._board.put(TrainingStatus(
            training_id=spec.training_id, request_id=spec.request_id,
            character_id=spec.character_id, trigger_word=spec.trigger_word, state="queued",
            step=done, total=spec.steps,
            estimated_time_minutes=self.estimate_minutes(spec, done)))


def _completed_status(info: LoraInfo) -> TrainingStatus:
    training = info.training or {}
    steps = int(training.get("steps", 0))
    return TrainingStatus(
        training_id=str(training.get("training_id", "")),
        request_id=str(training.get("request_id", "")),
        character_id=str(training.get("character_id", "")),
        trigger_word=info.trigger_word or "", state="completed", step=steps, total=steps,
        loss=training.get("final_loss"), lora_id=info.lora_id,
        validation_image_url=training.get("validation_image_url"), estimated_time_minutes=0)


def _outcome(info: LoraInfo, conversation_id: str | None, *, replayed: bool
             ) -> TrainingOutcome:
    training = info.training or {}
    return TrainingOutcome(
        training_id=str(training.get("training_id", "")),
        request_id=str(training.get("request_id", "")), conversation_id=conversation_id,
        character_id=str(training.get("character_id", "")),
        trigger_word=info.trigger_word or "", lora_id=info.lora_id,
        validation_image_url=training.get("validation_image_url"), replayed=replayed)


def _fmt(value: float | None) -> str:
    return "?" if value is None else f"{value:.4f}"
