"""The one core entry for LoRA training, used by Kafka and HTTP alike.

request → id (``{character_id}_{sha8(request_id)}``) → already running here? (joined;
one told to stop, its Kafka record revoked, is waited for, never joined: it would end
this request with it) → already registered? (a replay: the result at once) → claimed by
another instance? (HTTP: its live status, :mod:`core.training.claim`) → inputs on disk
from an earlier attempt, or in the shared store? (resumed, nothing fetched again) → else
checked in memory and written (:mod:`core.training.inputs`) → trained a chunk at a time
(:class:`TrainingRunner`) → registered as ``{character_id}_v{n}`` with a validation image
(:mod:`core.training.finish`) → folder removed.

Trainings run one at a time per engine (the others wait as ``queued``). Kafka waits for the
result (:meth:`TrainingService.train`); HTTP starts it in the background
(:meth:`TrainingService.submit`) and polls :meth:`TrainingService.status`. At start-up
:meth:`TrainingService.resume_pending` resumes HTTP-started trainings left unfinished by a
crash (Kafka ones resume when their request is redelivered).

With a shared store (:class:`~core.training.shared.SharedTrainings`) a training's inputs
and checkpoints are also kept there and its status written there under a lease
(:mod:`core.training.lease`): a training whose request moves to another instance (a
rebalance, a crash) resumes there from its last checkpoint without fetching its photos
again; every instance answers its status.

Nothing grows without bound: a per-training lock lives only while someone holds or waits
for it (:class:`~core.training.locks.KeyedLocks`); statuses of trainings not running here
expire (:class:`StatusBoard`); idle training folders are removed
(:mod:`core.training.orphans`).
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from core.image.service import ImageService
from core.lora.registry import LoraRegistry
from core.storage import StorageError, unavailable
from core.training.checkpoint import TrainingFolder, TrainingStore
from core.training.claim import Claims
from core.training.estimate import StepTimes
from core.training.finish import Registration
from core.training.inputs import TrainingInputs
from core.training.intake import Intake, spec_identity
from core.training.lease import STATUS_LEASE_SECONDS, SharedStatuses
from core.training.locks import KeyedLocks
from core.training.orphans import ORPHAN_TTL_SECONDS, OrphanSweeper
from core.training.outcome import TrainingOutcome, completed_status, outcome_of
from core.training.progress import ProgressFanout, ProgressListener
from core.training.register import find_registered
from core.training.runner import RunResult, TrainingInterrupted, TrainingRunner
from core.training.shared import SharedTrainings
from core.training.spec import Origin, TrainingLimits, TrainingSpec
from core.training.status import StatusBoard, TrainingStatus
from core.training.stopping import StopSignal
from schemas.errors import EngineError, InternalError
from schemas.events import LoraTrainingRequested

# the constants and the outcome stay importable from here, where callers have found them
__all__ = ["ORPHAN_TTL_SECONDS", "STATUS_LEASE_SECONDS", "TrainingOutcome", "TrainingService"]

_TRAINING_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Run:
    spec: TrainingSpec
    progress: ProgressFanout
    stop: StopSignal
    task: asyncio.Task[TrainingOutcome] | None = None


class TrainingService:
    """Trainings of this engine; see the module docstring. ``lora_dtype`` is the dtype of
    the saved LoRA weights (the model's: bf16 on CUDA, fp32 on a CPU); ``orphan_ttl`` the
    seconds after which an idle training folder is removed; ``owner`` who this instance
    is to the others in the shared store (a random id when not given)."""

    def __init__(
        self, runner: TrainingRunner, intake: Intake, store: TrainingStore,
        registry: LoraRegistry, images: ImageService, times: StepTimes, *,
        base_model: str, lora_dtype: torch.dtype, progress_interval: float,
        orphan_ttl: float = ORPHAN_TTL_SECONDS, shared: SharedTrainings | None = None,
        owner: str | None = None,
    ) -> None:
        self._runner = runner
        self._intake = intake
        self._store = store
        self._registry = registry
        self._times = times
        self._interval = progress_interval
        self._runs: dict[str, _Run] = {}
        self._board = StatusBoard(keep=lambda training_id: training_id in self._runs,
                                  on_change=self._share_status if shared else None)
        self._locks = KeyedLocks()
        self._orphans = OrphanSweeper(store, registry, self._board, self._locks, self._runs,
                                      orphan_ttl=orphan_ttl)
        owner = owner or uuid.uuid4().hex  # who writes statuses to the store
        self._statuses = SharedStatuses(shared, owner) if shared is not None else None
        self._claims = Claims(shared, owner, limits=intake.limits, times=times)
        self._inputs = TrainingInputs(intake, shared)
        self._registration = Registration(registry, images, base_model=base_model,
                                          lora_dtype=lora_dtype)
        self._gpu = asyncio.Semaphore(1)
        self._stopping = False

    @property
    def limits(self) -> TrainingLimits:
        """What requests are checked against (for readers of uploads: stop early)."""
        return self._intake.limits

    @property
    def in_progress(self) -> frozenset[str]:
        """The ids of the trainings running or queued here, Kafka and HTTP alike (for
        HTTP admission: MAX_IN_FLIGHT_LORA)."""
        return frozenset(self._runs)

    # ------------------------------------------------------------------ entries
    async def train(self, request: LoraTrainingRequested,
                    progress: ProgressListener | None = None) -> TrainingOutcome:
        """Train (or resume, or find) the LoRA ``request`` asks for and return it;
        ``progress(step, total, loss)`` hears the steps. Raises
        :class:`~schemas.errors.InvalidRequestError` naming the field (nothing written),
        :class:`~schemas.errors.UpstreamUnavailableError` (an image URL, or the shared
        store: retryable),
        :class:`~schemas.errors.OutOfMemoryError` (retryable: the checkpoint stays),
        :class:`~schemas.errors.InternalError`, or :class:`TrainingInterrupted` only when
        the engine stops first: a training stopped for another caller (its Kafka record
        revoked) is resumed from its checkpoint for this one. Cancelling the caller stops
        the training at its next step, checkpointed."""
        while True:
            begun = await self._begin(request, "kafka")
            if isinstance(begun, TrainingOutcome):
                return begun
            assert isinstance(begun, _Run)  # only HTTP trainings are left to another instance
            try:
                return await self._follow(begun, progress)
            except TrainingInterrupted:
                if self._stopping:
                    raise
                logger.info("request_id=%s training %s was stopped for another caller; it "
                            "resumes from its checkpoint", request.request_id,
                            begun.spec.training_id)

    async def _follow(self, run: _Run, progress: ProgressListener | None) -> TrainingOutcome:
        """``run``'s outcome, ``progress`` hearing its steps; cancelling the caller stops a
        Kafka run (checkpointed) and waits for it: its record comes again to resume it."""
        if progress is not None:
            run.progress.add(progress)
        assert run.task is not None
        try:
            return await asyncio.shield(run.task)
        except asyncio.CancelledError:
            if not run.task.done() and run.spec.origin == "kafka":
                run.stop.set()
                await asyncio.wait({run.task})
            raise
        finally:
            if progress is not None:
                run.progress.remove(progress)

    async def submit(self, request: LoraTrainingRequested, files: Sequence[Path] = ()
                     ) -> TrainingStatus:
        """Check ``request`` and start its training in the background (or find it running
        or registered); return its status. ``files`` are uploaded images (``images.{n}``
        after the inline ones), checked from their files and linked or copied into the
        training's folder before this returns (the caller may remove them then). Raises
        like :meth:`train` before anything starts."""
        begun = await self._begin(request, "http", files)
        if isinstance(begun, TrainingStatus):  # running on another instance
            return begun
        training_id = begun.training_id if isinstance(begun, TrainingOutcome) else (
            begun.spec.training_id)
        status = await self.status(training_id)  # in the store already: its claim
        assert status is not None
        return status

    async def status(self, training_id: str) -> TrainingStatus | None:
        """The status of ``training_id``: from memory, else the registry (completed), else
        its folder (queued: waiting to resume), else the shared store (another instance's,
        see :meth:`SharedStatuses.read`); None when unknown (or not a training id at all:
        a path trick never reaches the filesystem)."""
        if not _TRAINING_ID.fullmatch(training_id) or ".." in training_id:
            return None
        known = self._board.get(training_id)
        if known is not None:
            return known
        try:
            info = await asyncio.to_thread(find_registered, self._registry, training_id)
        except OSError as exc:  # the store failing: what is known here still answers
            logger.warning("training %s not looked up in the store: %s", training_id, exc)
            info = None
        if info is not None:
            return self._board.put(completed_status(info))
        folder = self._store.folder(training_id)
        spec = await asyncio.to_thread(folder.read_spec)
        if spec is None:
            if self._statuses is None:
                return None
            return await self._statuses.read(training_id)
        return self._queued(spec, await asyncio.to_thread(folder.latest_step))

    async def wait(self, training_id: str) -> TrainingStatus | None:
        """Wait until the training running here as ``training_id`` ends (at once when none
        does) and return its status; its errors are in the status, not raised."""
        run = self._runs.get(training_id)
        if run is not None and run.task is not None:
            await asyncio.wait({run.task})
        return await self.status(training_id)

    async def resume_pending(self) -> list[str]:
        """At start-up: resume HTTP-started trainings found on disk (ids returned), list
        Kafka ones as queued; remove the folders of incomplete inputs, of trainings already
        registered and of orphans (idle for ``orphan_ttl``)."""
        resumed: list[str] = []
        self._orphans.swept_now()
        for training_id in await asyncio.to_thread(self._store.training_ids):
            if training_id in self._runs or self._locks.busy(training_id):
                continue  # a request is at it already
            async with self._locks.hold(training_id):
                spec = await self._orphans.resumable(training_id)
                if spec is None:
                    continue
                done = await asyncio.to_thread(self._store.folder(training_id).latest_step)
                if spec.origin == "http" and await self._claims.claimed_elsewhere(
                        self._queued_status(spec, done)):
                    logger.info("request_id=%s training %s left by a previous run is "
                                "running on another instance now", spec.request_id,
                                training_id)
                elif spec.origin == "http":
                    logger.info("request_id=%s resuming training %s left by a previous run",
                                spec.request_id, training_id)
                    self._start(spec, done)
                    resumed.append(training_id)
                else:
                    self._queued(spec, done)
        return resumed

    async def remove_orphans(self) -> list[str]:
        """Remove the folders of trainings not running here and idle for ``orphan_ttl``
        seconds (ids returned); a folder a request is working on is left alone."""
        return await self._orphans.remove_orphans()

    def request_stop(self) -> None:
        """Stop every training at its next step (checkpointed) and take no new ones."""
        self._stopping = True
        for run in list(self._runs.values()):
            run.stop.set()

    async def close(self) -> None:
        """:meth:`request_stop`, then wait until every training has checkpointed and its
        last status (queued: resumable) has reached the shared store."""
        self.request_stop()
        tasks = [run.task for run in list(self._runs.values()) if run.task is not None]
        await asyncio.gather(*tasks, *self._orphans.sweeping(), return_exceptions=True)
        if self._statuses is not None:
            await self._statuses.close()

    def estimate_minutes(self, spec: TrainingSpec, done: int = 0) -> int:
        """Minutes the rest of ``spec`` should take, from measured step times."""
        return self._times.estimate_minutes(spec.steps - done, spec.resolution,
                                            spec.batch_size)

    # ------------------------------------------------------------- starting
    async def _begin(self, request: LoraTrainingRequested, origin: Origin,
                     files: Sequence[Path] = ()) -> _Run | TrainingOutcome | TrainingStatus:
        if self._stopping:
            raise TrainingInterrupted("the engine is stopping")
        training_id = spec_identity(request)
        self._orphans.sweep_when_due()
        async with self._locks.hold(training_id):
            running = self._runs.get(training_id)
            if running is not None and not running.stop.is_set():
                return running
            if running is not None:  # never joined: this request would end with it
                await self._stopped(running)
            try:
                info = await asyncio.to_thread(find_registered, self._registry, training_id)
            except StorageError as exc:  # registered or not is unknown: not trained again
                raise unavailable(exc) from exc
            folder = self._store.folder(training_id)
            if info is not None:
                logger.info("request_id=%s training %s was done before: LoRA %s",
                            request.request_id, training_id, info.lora_id)
                await asyncio.to_thread(folder.remove)
                self._board.put(completed_status(info))
                return outcome_of(info, request.conversation_id, replayed=True,
                                  registry=self._registry)
            claim = self._claims.status_for(request) if origin == "http" else None
            if claim is not None and (elsewhere := await self._claims.claim(claim)) is not None:
                logger.info("request_id=%s training %s runs on another instance: not "
                            "started here", request.request_id, training_id)
                return elsewhere
            async with self._claims.renewing(claim):
                spec = await self._inputs.prepare(request, origin, folder, files)
                return self._start(spec, await asyncio.to_thread(folder.latest_step))

    async def _stopped(self, run: _Run) -> None:
        """Wait until ``run``, told to stop (its Kafka record was revoked, and this is the
        record come again, or another request for it), has stopped at its checkpoint, for
        the caller to resume it from there (or find it registered, if it finished first).
        Raises :class:`TrainingInterrupted` when the engine is stopping."""
        logger.info("request_id=%s training %s is stopping; it resumes from its checkpoint "
                    "once stopped", run.spec.request_id, run.spec.training_id)
        assert run.task is not None
        await asyncio.wait({run.task})
        if self._stopping:
            raise TrainingInterrupted("the engine is stopping")

    def _start(self, spec: TrainingSpec, done: int) -> _Run:
        training_id = spec.training_id

        def report(step: int, loss: float | None) -> None:
            self._board.update(training_id, state="training", step=step, loss=loss,
                               estimated_time_minutes=self.estimate_minutes(spec, step))

        run = _Run(spec, ProgressFanout(spec.steps, self._interval, report), StopSignal())
        self._runs[training_id] = run  # first: a running training's status is kept
        self._queued(spec, done)
        run.task = asyncio.create_task(self._execute(run), name=f"training-{training_id}")
        run.task.add_done_callback(lambda task: self._ended(run, task))
        if self._statuses is not None:
            self._statuses.keep_fresh(lambda: bool(self._runs) and not self._stopping,
                                      self._renew_statuses)
        return run

    def _ended(self, run: _Run, task: asyncio.Task[TrainingOutcome]) -> None:
        training_id = run.spec.training_id
        if self._runs.get(training_id) is run:
            del self._runs[training_id]
        if not task.cancelled():
            task.exception()  # retrieved: HTTP runs have nobody awaiting them

    # ------------------------------------------------------------- running
    async def _execute(self, run: _Run) -> TrainingOutcome:
        spec = run.spec
        folder = self._store.folder(spec.training_id)
        try:
            async with self._gpu:
                await asyncio.to_thread(folder.touch)  # active: no orphan
                self._board.update(spec.training_id, state="training")
                result = await self._runner.run(spec, folder, run.progress, run.stop,
                                                self._inputs.checkpointed(folder))
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
            await asyncio.to_thread(folder.touch)  # idle from now: the orphan clock starts
            await run.progress.aclose()  # progress events precede the result

    async def _failed(self, spec: TrainingSpec, folder: TrainingFolder,
                      error: EngineError) -> None:
        logger.error("request_id=%s training %s failed: %s %s", spec.request_id,
                     spec.training_id, error.code, error, exc_info=error.code == "INTERNAL")
        self._board.update(spec.training_id, state="failed", error_code=str(error.code),
                           error=error.public_message, retryable=error.retryable)
        if not error.retryable:  # a retry would fail alike: leave nothing behind
            await asyncio.to_thread(folder.remove)
            await self._inputs.discard(spec.training_id)

    async def _finish(self, spec: TrainingSpec, folder: TrainingFolder,
                      result: RunResult) -> TrainingOutcome:
        info = await self._registration.register(spec, folder, result)
        await asyncio.to_thread(folder.remove)
        await self._inputs.discard(spec.training_id)
        self._board.put(completed_status(info))
        logger.info("request_id=%s training %s completed: LoRA %s (probe loss %s → %s)",
                    spec.request_id, spec.training_id, info.lora_id,
                    _fmt(result.probe_start), _fmt(result.probe_end))
        return outcome_of(info, spec.conversation_id, replayed=False,
                          registry=self._registry)

    # ------------------------------------------------------------- statuses
    def _share_status(self, status: TrainingStatus) -> None:
        """The board's every change, for the store: only of a training running here (a
        status read here of a training run elsewhere is not ours to write)."""
        run = self._runs.get(status.training_id)
        if run is not None and self._statuses is not None:
            self._statuses.write(status, run.spec.origin)

    def _renew_statuses(self) -> None:
        for training_id in list(self._runs):
            self._board.update(training_id)  # a new updated_at, heard by the store

    def _queued(self, spec: TrainingSpec, done: int) -> TrainingStatus:
        return self._board.put(self._queued_status(spec, done))

    def _queued_status(self, spec: TrainingSpec, done: int) -> TrainingStatus:
        return TrainingStatus(
            training_id=spec.training_id, request_id=spec.request_id,
            character_id=spec.character_id, trigger_word=spec.trigger_word, state="queued",
            step=done, total=spec.steps,
            estimated_time_minutes=self.estimate_minutes(spec, done))


def _fmt(value: float | None) -> str:
    return "?" if value is None else f"{value:.4f}"
