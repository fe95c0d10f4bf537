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

With a shared store (:class:`~core.training.shared.SharedTrainings`) a training's inputs
and checkpoints are also kept there and its status written there at every change (and
every quarter of :data:`STATUS_LEASE_SECONDS` while it runs or waits: its heartbeat): a
training whose request moves to another instance (a rebalance, a crash) resumes there from
its last checkpoint without fetching its photos again; every instance answers its status.
An HTTP training is claimed in the store (its status created conditionally) before its
photos are taken in, so the same POST reaching two instances at once, or a retry reaching
another, is trained once: the other answers the live status. A status not renewed for
:data:`STATUS_LEASE_SECONDS` belongs to an instance that is gone: it is reported as
``failed`` (retryable) for HTTP trainings, ``queued`` for Kafka ones (Kafka redelivers
them), and a retried POST takes the training over from its last checkpoint in the store.
A store that fails while a training is restored from it is a retryable
``UPSTREAM_UNAVAILABLE``, never a fresh start.

Nothing grows without bound: a per-training lock lives only while someone holds or waits
for it; statuses of trainings not running here expire (:class:`StatusBoard`); a training
folder nobody works on for ``orphan_ttl`` seconds (default :data:`ORPHAN_TTL_SECONDS`, a
day) is removed: at start-up (with the folders of incomplete inputs and of registered
trainings) and then at most every ``orphan_ttl / 4`` seconds when a request comes. Such a
folder belongs to a request that went to another instance or was abandoned; a younger one
may still resume (HTTP ones at start-up, Kafka ones when redelivered) and is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from dataclasses import replace as replaced
from pathlib import Path

import torch

from core.image.service import ImageService
from core.lora.registry import LoraInfo, LoraRegistry
from core.storage import StorageError, unavailable
from core.training.checkpoint import TrainingFolder, TrainingStore
from core.training.estimate import StepTimes
from core.training.intake import Intake, spec_identity
from core.training.progress import ProgressFanout, ProgressListener
from core.training.register import find_registered, register_lora
from core.training.runner import RunResult, TrainingInterrupted, TrainingRunner
from core.training.shared import SharedTrainings
from core.training.spec import Origin, TrainingLimits, TrainingSpec
from core.training.status import StatusBoard, TrainingStatus
from schemas.errors import EngineError, InternalError
from schemas.events import ImageRequested, LoraTrainingRequested, utc_now_iso

__all__ = ["ORPHAN_TTL_SECONDS", "STATUS_LEASE_SECONDS", "TrainingOutcome", "TrainingService"]

_TRAINING_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")

ORPHAN_TTL_SECONDS = 24 * 3600.0
# a status in the store not renewed for this long belongs to nobody (its instance is gone);
# its owner renews it every quarter of this (a checkpoint may take far longer than that)
STATUS_LEASE_SECONDS = 120.0

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
    location: str | None = None  # the registration in the shared store, if there is one


@dataclass(eq=False)
class _Run:
    spec: TrainingSpec
    progress: ProgressFanout
    stop: threading.Event
    task: asyncio.Task[TrainingOutcome] | None = None


class _KeyedLocks:
    """One :class:`asyncio.Lock` per key, kept only while someone holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._users: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._locks)

    def busy(self, key: str) -> bool:
        """Whether ``key`` is held or waited for."""
        return key in self._users

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(key, asyncio.Lock())
        self._users[key] = self._users.get(key, 0) + 1
        try:
            async with lock:
                yield
        finally:
            self._users[key] -= 1
            if not self._users[key]:
                del self._users[key], self._locks[key]


class TrainingService:
    """Trainings of this engine; see the module docstring. ``lora_dtype`` is the dtype of
    the saved LoRA weights (the model's: bf16 on CUDA, fp32 on a CPU); ``orphan_ttl`` the
    seconds after which an idle training folder is removed."""

    def __init__(
        self, runner: TrainingRunner, intake: Intake, store: TrainingStore,
        registry: LoraRegistry, images: ImageService, times: StepTimes, *,
        base_model: str, lora_dtype: torch.dtype, progress_interval: float,
        orphan_ttl: float = ORPHAN_TTL_SECONDS, shared: SharedTrainings | None = None,
        owner: str | None = None,
    ) -> None:
        if orphan_ttl <= 0:
            raise ValueError(f"orphan_ttl must be > 0, got {orphan_ttl}")
        self._runner = runner
        self._intake = intake
        self._store = store
        self._registry = registry
        self._images = images
        self._times = times
        self._base_model = base_model
        self._lora_dtype = lora_dtype
        self._interval = progress_interval
        self._orphan_ttl = orphan_ttl
        self._runs: dict[str, _Run] = {}
        self._shared = shared
        self._owner = owner or uuid.uuid4().hex  # who writes statuses to the store
        self._status_writes: dict[str, asyncio.Task[None]] = {}  # one writer per training
        self._unwritten: dict[str, tuple[TrainingStatus, Origin]] = {}  # not yet written
        self._heartbeat: asyncio.Task[None] | None = None  # keeps running statuses fresh
        self._board = StatusBoard(keep=lambda training_id: training_id in self._runs,
                                  on_change=self._share_status if shared else None)
        self._locks = _KeyedLocks()
        self._gpu = asyncio.Semaphore(1)
        self._stopping = False
        self._swept_at = time.monotonic()
        self._sweeping: asyncio.Task[list[str]] | None = None

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
        :class:`~schemas.errors.UpstreamUnavailableError` (an image URL, or the shared
        store: retryable),
        :class:`~schemas.errors.OutOfMemoryError` (retryable: the checkpoint stays),
        :class:`~schemas.errors.InternalError`, or :class:`TrainingInterrupted` when the
        engine stops first. Cancelling the caller stops the training at its next step,
        checkpointed."""
        begun = await self._begin(request, "kafka")
        if isinstance(begun, TrainingOutcome):
            return begun
        assert isinstance(begun, _Run)  # only HTTP trainings are left to another instance
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
        its folder (queued: waiting to resume); None when unknown (or not a training id
        at all: a path trick never reaches the filesystem)."""
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
            return self._board.put(_completed_status(info))
        folder = self._store.folder(training_id)
        spec = await asyncio.to_thread(folder.read_spec)
        if spec is None:
            return await self._shared_status(training_id)
        return self._queued(spec, await asyncio.to_thread(folder.latest_step))

    async def _shared_status(self, training_id: str) -> TrainingStatus | None:
        """The status another instance wrote to the store (a training running there); a
        queued or running one not renewed for :data:`STATUS_LEASE_SECONDS` is abandoned
        (its instance is gone): ``queued`` again for a Kafka training (its request is
        redelivered), ``failed`` and retryable for an HTTP one (nothing would resume it
        but a retried POST, which takes it over from its last checkpoint). None without a
        store, when it has none, or fails (logged)."""
        if self._shared is None:
            return None
        try:
            found = await asyncio.to_thread(self._shared.get_status, training_id)
        except OSError as exc:
            logger.warning("status of training %s not read from the store: %s",
                           training_id, exc)
            return None
        if found is None:
            return None
        status = found.status
        if status.state not in ("queued", "training") or found.live(STATUS_LEASE_SECONDS):
            return status
        if found.origin == "kafka":
            return replaced(status, state="queued")
        return replaced(
            status, state="failed", error_code="TIMEOUT", retryable=True,
            estimated_time_minutes=None,
            error=f"the instance running this training stopped (its status was not "
                  f"renewed for {STATUS_LEASE_SECONDS:g} s); POST /train-lora again with the "
                  "same request_id to resume it from its last checkpoint")

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
        self._swept_at = time.monotonic()
        for training_id in await asyncio.to_thread(self._store.training_ids):
            if training_id in self._runs or self._locks.busy(training_id):
                continue  # a request is at it already
            async with self._locks.hold(training_id):
                spec = await self._resumable(training_id)
                if spec is None:
                    continue
                done = await asyncio.to_thread(self._store.folder(training_id).latest_step)
                if spec.origin == "http" and await self._claimed_elsewhere(spec, done):
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
        self._swept_at = time.monotonic()
        removed: list[str] = []
        for training_id in await asyncio.to_thread(self._store.training_ids):
            if training_id in self._runs or self._locks.busy(training_id):
                continue
            async with self._locks.hold(training_id):
                folder = self._store.folder(training_id)
                if await asyncio.to_thread(folder.idle_seconds) > self._orphan_ttl:
                    await self._remove(training_id, "an orphan: idle for more than "
                                       f"{self._orphan_ttl:g} s")
                    removed.append(training_id)
        return removed

    async def _resumable(self, training_id: str) -> TrainingSpec | None:
        """The spec of a folder found at start-up, or None after removing the folder
        (incomplete, registered or orphaned). Called holding the training's lock."""
        folder = self._store.folder(training_id)
        spec = await asyncio.to_thread(self._store.complete_spec, training_id)
        if spec is None:
            await self._remove(training_id, "no complete training inputs")
        elif await self._registered_or_unknown(training_id):
            await self._remove(training_id, "registered already")
        elif await asyncio.to_thread(folder.idle_seconds) > self._orphan_ttl:
            await self._remove(training_id, "an orphan: idle for more than "
                               f"{self._orphan_ttl:g} s")
        else:
            return spec
        return None

    async def _registered_or_unknown(self, training_id: str) -> bool:
        """Whether ``training_id`` registered its LoRA; a store that fails says nothing,
        so the folder is kept (False)."""
        try:
            return await asyncio.to_thread(find_registered, self._registry,
                                           training_id) is not None
        except OSError as exc:
            logger.warning("training %s not looked up in the store: %s", training_id, exc)
            return False

    async def _remove(self, training_id: str, why: str) -> None:
        logger.info("removing training folder %s: %s", training_id, why)
        await asyncio.to_thread(self._store.folder(training_id).remove)
        self._board.forget(training_id)

    def _sweep_when_due(self) -> None:
        """Start :meth:`remove_orphans` in the background every ``orphan_ttl / 4`` s."""
        due = time.monotonic() - self._swept_at > self._orphan_ttl / 4
        if due and (self._sweeping is None or self._sweeping.done()):
            self._swept_at = time.monotonic()
            self._sweeping = asyncio.create_task(self.remove_orphans(),
                                                 name="training-orphans")
            self._sweeping.add_done_callback(_log_sweep)

    def request_stop(self) -> None:
        """Stop every training at its next step (checkpointed) and take no new ones."""
        self._stopping = True
        for run in list(self._runs.values()):
            run.stop.set()

    async def close(self) -> None:
        """:meth:`request_stop`, then wait until every training has checkpointed."""
        self.request_stop()
        tasks = [run.task for run in list(self._runs.values()) if run.task is not None]
        sweeping = [self._sweeping] if self._sweeping is not None else []
        await asyncio.gather(*tasks, *sweeping, return_exceptions=True)
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        # the last statuses (queued: resumable) reach the store before the engine goes
        await asyncio.gather(*self._status_writes.values(), return_exceptions=True)

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
        self._sweep_when_due()
        async with self._locks.hold(training_id):
            running = self._runs.get(training_id)
            if running is not None:
                return running
            try:
                info = await asyncio.to_thread(find_registered, self._registry, training_id)
            except StorageError as exc:  # registered or not is unknown: not trained again
                raise unavailable(exc) from exc
            folder = self._store.folder(training_id)
            if info is not None:
                logger.info("request_id=%s training %s was done before: LoRA %s",
                            request.request_id, training_id, info.lora_id)
                await asyncio.to_thread(folder.remove)
                self._board.put(_completed_status(info))
                return _outcome(info, request.conversation_id, replayed=True,
                                registry=self._registry)
            claim = self._claim_for(request) if origin == "http" else None
            if claim is not None and (elsewhere := await self._claim(claim)) is not None:
                logger.info("request_id=%s training %s runs on another instance: not "
                            "started here", request.request_id, training_id)
                return elsewhere
            async with self._renewing(claim):
                spec = await asyncio.to_thread(folder.read_spec)
                if self._shared is not None and (spec is None or await self._behind(folder)):
                    spec = await self._restored(folder)
                if spec is not None and spec.request_id == request.request_id:
                    logger.info("request_id=%s training %s found on disk",
                                request.request_id, training_id)
                else:
                    spec = await self._take_in(request, origin, folder, files)
                return self._start(spec, await asyncio.to_thread(folder.latest_step))

    def _claim_for(self, request: LoraTrainingRequested) -> TrainingStatus | None:
        """The status that claims ``request``'s training in the store (None without one):
        queued at step 0 until its inputs are known."""
        if self._shared is None:
            return None
        limits = self._intake.limits
        steps = request.steps or limits.default_steps
        return TrainingStatus(
            training_id=spec_identity(request), request_id=request.request_id,
            character_id=request.character_id, trigger_word=request.trigger_word,
            state="queued", step=0, total=steps, updated_at=utc_now_iso(),
            estimated_time_minutes=self._times.estimate_minutes(
                steps, request.resolution or limits.default_resolution, limits.batch_size))

    async def _claim(self, status: TrainingStatus) -> TrainingStatus | None:
        """Claims the HTTP training of ``status`` in the store for this instance (None);
        the live status of the instance at it instead. Raises
        :class:`~schemas.errors.UpstreamUnavailableError` when the store fails (whether
        another instance is at it is unknown: not started here)."""
        assert self._shared is not None
        try:
            found = await asyncio.to_thread(self._shared.claim, status, self._owner, "http",
                                            lease=STATUS_LEASE_SECONDS)
        except StorageError as exc:
            raise unavailable(exc) from exc
        return found.status if found is not None else None

    async def _claimed_elsewhere(self, spec: TrainingSpec, done: int) -> bool:
        """At start-up, for an HTTP training found on disk: whether another instance is
        at it (its claim live); a store that fails says no (logged: this one goes on as if
        alone, as without a store)."""
        if self._shared is None:
            return False
        status = replaced(self._queued_status(spec, done), updated_at=utc_now_iso())
        try:
            return await self._claim(status) is not None
        except EngineError as exc:
            logger.warning("training %s not claimed in the store: %s", spec.training_id, exc)
            return False

    @asynccontextmanager
    async def _renewing(self, claim: TrainingStatus | None) -> AsyncIterator[None]:
        """While the claimed training is taken in (checking and uploading its photos may
        outlast the lease), its claim is renewed as the heartbeat renews running ones; if
        it is never started (refused, failed), the claim is let go: a retryable failure
        is recorded (any instance may take the training over), anything else removes it."""
        if claim is None:
            yield
            return
        shared = self._shared
        assert shared is not None

        stop = asyncio.Event()

        async def renew() -> None:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), STATUS_LEASE_SECONDS / 4)
                    return
                try:
                    await asyncio.to_thread(shared.put_status, replaced(
                        claim, updated_at=utc_now_iso()), self._owner, "http")
                except OSError as exc:
                    logger.warning("claim of training %s not renewed: %s",
                                   claim.training_id, exc)

        async def stop_renewing() -> None:
            # stopped between writes, never cancelled mid-write: a renewal written from its
            # thread after the claim was let go would bring a live claim back
            stop.set()
            await asyncio.gather(renewing, return_exceptions=True)

        renewing = asyncio.create_task(renew(), name=f"training-claim-{claim.training_id}")
        try:
            yield
        except BaseException as exc:
            await stop_renewing()
            await self._let_go(claim, exc)
            raise
        finally:
            await stop_renewing()

    async def _let_go(self, claim: TrainingStatus, error: BaseException) -> None:
        assert self._shared is not None
        try:
            if isinstance(error, EngineError) and error.retryable:
                await asyncio.to_thread(self._shared.put_status, replaced(
                    claim, state="failed", error_code=str(error.code),
                    error=error.public_message, retryable=True, estimated_time_minutes=None,
                    updated_at=utc_now_iso()), self._owner, "http")
            else:
                await asyncio.to_thread(self._shared.drop_status, claim.training_id)
        except OSError as exc:
            logger.warning("claim of training %s not let go: %s", claim.training_id, exc)

    async def _behind(self, folder: TrainingFolder) -> bool:
        """Whether the store holds a later checkpoint than this folder (another instance
        went on with the training since this one left it). Raises
        :class:`~schemas.errors.UpstreamUnavailableError` when the store fails: going on
        from the local checkpoint would throw a later one away."""
        assert self._shared is not None
        try:
            stored = await asyncio.to_thread(self._shared.checkpoint_step,
                                             folder.path.name)
        except StorageError as exc:
            raise unavailable(exc) from exc
        return stored is not None and stored > await asyncio.to_thread(folder.latest_step)

    async def _restored(self, folder: TrainingFolder) -> TrainingSpec | None:
        """The spec of the training's inputs and checkpoint brought from the store (another
        instance began it or went on with it), or None when the store has none. Whatever
        the folder held is replaced. A store that fails (or a checkpoint replaced while it
        was read) raises :class:`~schemas.errors.UpstreamUnavailableError`: retryable,
        and nothing in the store is touched (starting over would delete its checkpoint)."""
        assert self._shared is not None
        await asyncio.to_thread(folder.remove)
        try:
            step = await asyncio.to_thread(self._shared.restore, folder)
        except StorageError as exc:
            await asyncio.to_thread(folder.remove)
            raise unavailable(exc) from exc
        except OSError as exc:  # the local disk's
            await asyncio.to_thread(folder.remove)
            raise InternalError(f"training {folder.path.name} could not be restored from "
                                f"the store: {exc}") from exc
        if step is None:
            return None
        return await asyncio.to_thread(folder.read_spec)

    async def _take_in(self, request: LoraTrainingRequested, origin: Origin,
                       folder: TrainingFolder, files: Sequence[Path]) -> TrainingSpec:
        spec, images = await self._intake.take(request, origin, files)  # raises before writing
        try:
            await asyncio.to_thread(folder.remove)  # another request's leftovers, if any
            await asyncio.to_thread(folder.write_inputs, spec, images)
            if self._shared is not None:  # the photos, kept for whoever resumes it
                await asyncio.to_thread(self._shared.save_inputs, folder)
        except StorageError as exc:
            await asyncio.to_thread(folder.remove)
            raise unavailable(exc) from exc
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
        self._runs[training_id] = run  # first: a running training's status is kept
        self._queued(spec, done)
        run.task = asyncio.create_task(self._execute(run), name=f"training-{training_id}")
        run.task.add_done_callback(lambda task: self._ended(run, task))
        if self._shared is not None and (self._heartbeat is None or self._heartbeat.done()):
            self._heartbeat = asyncio.create_task(self._keep_statuses_fresh(),
                                                  name="training-status-heartbeat")
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
                                                self._checkpointed(folder))
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
            await self._discard_shared(spec.training_id)

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
        try:  # a failing store: retryable, the last checkpoint stays for the retry
            info = await asyncio.to_thread(
                register_lora, self._registry, folder, spec, result.state.weights,
                dtype=self._lora_dtype, base_model=self._base_model, training=training)
        except StorageError as exc:
            raise unavailable(exc) from exc
        url = await self._validation_image(spec, info.lora_id)
        if url is not None:
            training["validation_image_url"] = url
            try:
                info = await asyncio.to_thread(
                    self._registry.register, info.lora_id, info.path,
                    trigger_word=spec.trigger_word, base_model=self._base_model,
                    training=training, replace=True)
            except StorageError as exc:  # registered already: only the URL is missing
                logger.warning("request_id=%s validation image of %s not recorded: %s",
                               spec.request_id, info.lora_id, exc)
        await asyncio.to_thread(folder.remove)
        await self._discard_shared(spec.training_id)
        self._board.put(_completed_status(info))
        logger.info("request_id=%s training %s completed: LoRA %s (probe loss %s → %s)",
                    spec.request_id, spec.training_id, info.lora_id,
                    _fmt(result.probe_start), _fmt(result.probe_end))
        return _outcome(info, spec.conversation_id, replayed=False,
                        registry=self._registry)

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

    # ------------------------------------------------------- the shared store
    def _checkpointed(self, folder: TrainingFolder) -> Callable[[int], Awaitable[None]] | None:
        """What the runner awaits after each checkpoint: its copy in the store. A store
        that fails is logged; the training goes on (the checkpoint is on disk)."""
        shared = self._shared
        if shared is None:
            return None

        async def upload(step: int) -> None:
            try:
                await asyncio.to_thread(shared.save_checkpoint, folder, step)
            except OSError as exc:
                logger.warning("checkpoint %d of training %s not kept in the store: %s",
                               step, folder.path.name, exc)

        return upload

    async def _discard_shared(self, training_id: str) -> None:
        if self._shared is None:
            return
        try:
            await asyncio.to_thread(self._shared.discard, training_id)
        except OSError as exc:
            logger.warning("inputs of training %s left in the store: %s", training_id, exc)

    def _share_status(self, status: TrainingStatus) -> None:
        """Writes ``status`` of a training running here to the store in the background:
        one write per training at a time, the latest status winning (a burst of progress
        is one or two writes)."""
        training_id = status.training_id
        run = self._runs.get(training_id)
        if run is None:
            return  # a status read here of a training run elsewhere is not ours to write
        self._unwritten[training_id] = (status, run.spec.origin)
        if training_id not in self._status_writes:
            self._status_writes[training_id] = asyncio.get_running_loop().create_task(
                self._write_statuses(training_id), name=f"training-status-{training_id}")

    async def _keep_statuses_fresh(self) -> None:
        """While trainings run or wait here, their statuses in the store are rewritten
        every quarter of :data:`STATUS_LEASE_SECONDS`, so that one queued behind another
        training for hours, or in a chunk longer than the lease, is not taken for
        abandoned by another instance."""
        while self._runs and not self._stopping:
            await asyncio.sleep(STATUS_LEASE_SECONDS / 4)
            for training_id in list(self._runs):
                self._board.update(training_id)  # a new updated_at, heard by the store

    async def _write_statuses(self, training_id: str) -> None:
        assert self._shared is not None
        try:
            while (latest := self._unwritten.pop(training_id, None)) is not None:
                status, origin = latest
                try:
                    await asyncio.to_thread(self._shared.put_status, status, self._owner,
                                            origin)
                except OSError as exc:
                    logger.warning("status of training %s not written to the store: %s",
                                   training_id, exc)
        finally:
            del self._status_writes[training_id]

    def _queued(self, spec: TrainingSpec, done: int) -> TrainingStatus:
        return self._board.put(self._queued_status(spec, done))

    def _queued_status(self, spec: TrainingSpec, done: int) -> TrainingStatus:
        return TrainingStatus(
            training_id=spec.training_id, request_id=spec.request_id,
            character_id=spec.character_id, trigger_word=spec.trigger_word, state="queued",
            step=done, total=spec.steps,
            estimated_time_minutes=self.estimate_minutes(spec, done))


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


def _outcome(info: LoraInfo, conversation_id: str | None, *, replayed: bool,
             registry: LoraRegistry) -> TrainingOutcome:
    training = info.training or {}
    return TrainingOutcome(
        training_id=str(training.get("training_id", "")),
        request_id=str(training.get("request_id", "")), conversation_id=conversation_id,
        character_id=str(training.get("character_id", "")),
        trigger_word=info.trigger_word or "", lora_id=info.lora_id,
        validation_image_url=training.get("validation_image_url"), replayed=replayed,
        location=registry.shared.location(info.lora_id) if registry.shared else None)


def _log_sweep(task: asyncio.Task[list[str]]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("removing orphaned training folders failed", exc_info=task.exception())


def _fmt(value: float | None) -> str:
    return "?" if value is None else f"{value:.4f}"
