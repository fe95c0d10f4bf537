"""The GPU worker: one thread owns the pipeline; everything else talks to it through a queue.

Work is taken in the order of :mod:`core.scheduling.gpu_queue`: interactive before
background, owners (conversations) in turn. Jobs are batched when compatible
(:func:`~core.image.job.batch_key`) and of one priority, up to ``max_batch_size``, waiting
at most ``batch_window_ms`` to gather. LoRA loading, switching and unloading happen only in
this thread, between pipeline calls. Callables given to :meth:`GpuWorker.run_exclusive`
(LoRA training) run there too, between jobs.

A job whose caller goes away is dropped if queued; if it runs, the call stops at its next
step once every job in it is withdrawn (:class:`RequestCancelledError`).

Out of memory: the memory is freed and every job of the failed call is retried once,
alone; a job that fails alone too gets :class:`GpuOutOfMemoryError` and the worker goes on
serving. So a job that cannot fit costs two GPU attempts (batched then alone, or alone
twice), never more: the error is ``retryable`` for operators, but marked
:class:`~core.retry_budget.RetriesSpent` so that the consume loop does not run it again.
Torch's error is kept only as text: its traceback holds the failed call's frames, and
through them its tensors, so it is cut before the memory is freed and never stored.
"""

from __future__ import annotations

import asyncio
import copy
import gc
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import torch
from PIL.Image import Image

from core.health import WorkerPulse
from core.image._call import Aborted, AllCancelled, call_pipeline
from core.image.img2img import ImageToImage
from core.image.job import ImageJob, batch_key, decoded_in_tiles
from core.image.loader import LoadedModel
from core.lora.adapters import AdapterSet
from core.metrics import EngineMetrics
from core.retry_budget import RetriesSpent
from core.scheduling.gpu_queue import ExclusiveItem, JobItem, StopItem, WorkQueue
from core.scheduling.placement import Placement, Priority
from schemas.errors import (
    EngineError,
    InternalError,
    InvalidRequestError,
    OutOfMemoryError,
    RequestCancelledError,
)

__all__ = ["GpuOutOfMemoryError", "GpuWorker", "ImageJob"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
OomInjector = Callable[[list[ImageJob]], None]
_STOPPED = "the GPU worker is stopped"
_ANY_OWNER = Placement()  # interactive, the shared owner, no deadline (frozen: safe to share)
_GPU_ATTEMPTS = 2  # a job's attempts before it is out of memory for good


class GpuOutOfMemoryError(OutOfMemoryError, RetriesSpent):
    """``OUT_OF_MEMORY`` after the worker's own second attempt at a job: ``retryable`` (a
    quieter GPU may fit it) but not retried here or by the consume loop; ``attempts`` is
    the GPU attempts it cost. It carries torch's message, never torch's error."""

    def __init__(self, message: str, *, attempts: int = _GPU_ATTEMPTS) -> None:
        super().__init__(message)
        self.attempts = attempts


class GpuWorker:
    """Runs image jobs and exclusive calls on ``model`` in one thread.

    Settings arrive as arguments and are checked here (``ValueError`` naming the
    variable). ``oom_injector(jobs)`` is a test seam called before each pipeline call; it
    may raise ``torch.cuda.OutOfMemoryError`` to exercise the recovery path.
    """

    def __init__(
        self,
        model: LoadedModel,
        *,
        max_batch_size: int,
        batch_window_ms: int,
        lora_cache_size: int,
        vae_tiling_threshold: int,
        max_sequence_length: int,
        metrics: EngineMetrics | None = None,
        oom_injector: OomInjector | None = None,
    ) -> None:
        _check_settings(model, max_batch_size, batch_window_ms, vae_tiling_threshold,
                        max_sequence_length)
        self._model = model
        self._max_images = max_batch_size  # per job: a job's images are one batch
        # A content-driven step cache decides for the whole batch: requests run alone (a
        # request's own images still go together), so pixels never depend on neighbours.
        self._max_batch = 1 if model.acceleration.batch_dependent else max_batch_size
        self._window_s = batch_window_ms / 1000
        self._tiling_threshold = vae_tiling_threshold
        self._max_sequence_length = max_sequence_length
        self._metrics = metrics
        self._oom_injector = oom_injector
        self._observed = True  # False during warm_up(): those images are no one's
        self._adapters = AdapterSet(
            model.pipeline,
            capacity=lora_cache_size,
            hotswap_slot=model.hotswap_slot,
            on_switch=self._when_observed(metrics.lora_switch_seconds.observe)
            if metrics else None,
            on_evict=metrics.lora_evictions.inc if metrics else None,
            on_load=self._when_observed(metrics.lora_load_seconds.observe)
            if metrics else None,
        )
        self._queue = WorkQueue(batch_key, size=_images_of)
        self._img2img = ImageToImage(model.pipeline)
        self._abort = threading.Event()
        self._lock = threading.Lock()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._tiling: bool | None = None
        self._busy_since: float | None = None  # monotonic start of the item at work

    @property
    def max_sequence_length(self) -> int:
        """FLUX_MAX_SEQUENCE_LENGTH: T5's prompt is padded to it."""
        return self._max_sequence_length

    @property
    def vae_tiling_threshold(self) -> int:
        """VAE_TILING_THRESHOLD: an image with a side above it is decoded in tiles."""
        return self._tiling_threshold

    @property
    def model(self) -> LoadedModel:
        return self._model

    @property
    def loaded_loras(self) -> list[str]:
        """Ids of the LoRAs loaded now, least recently used first (a snapshot)."""
        return self._adapters.loaded

    def start(self) -> None:
        """Start the worker thread. Raises ``RuntimeError`` when started twice or stopped."""
        with self._lock:
            if self._thread is not None or self._closed:
                raise RuntimeError("GpuWorker.start() may be called once, before stop()")
            self._thread = threading.Thread(target=self._serve, name="gpu-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30) -> None:
        """Stop taking work and finish what is queued within ``timeout`` seconds; after
        that, the running call is cut short at its next step and every job not done fails
        with :class:`InternalError`. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(StopItem())
            thread = self._thread
        if thread is None:
            self._fail_queued()
            return
        thread.join(timeout)
        if thread.is_alive():
            logger.warning("GPU worker did not finish its queue in %.1f s; aborting", timeout)
            self._abort.set()
            thread.join(max(timeout, 5.0))
            if thread.is_alive():  # an exclusive call that never returns
                logger.error("GPU worker thread still busy after abort; leaving it")
                self._fail_queued()

    def pulse(self) -> WorkerPulse:
        """What the worker thread is doing now (for the liveness probe); safe from any
        thread."""
        since = self._busy_since
        thread = self._thread
        if self._closed:
            return WorkerPulse("stopped")
        if thread is not None and not thread.is_alive():
            return WorkerPulse("dead")
        if since is None:
            return WorkerPulse("idle")
        return WorkerPulse("busy", max(0.0, time.monotonic() - since))

    def depth(self) -> dict[Priority, int]:
        """Items queued and not started, per priority (for metrics and admission)."""
        return self._queue.depth()

    def submit(self, job: ImageJob, placement: Placement = _ANY_OWNER) -> Future[Image]:
        """Queue ``job`` (of one image) where ``placement`` puts it; the future resolves to
        its image or an :class:`EngineError` (:class:`OutOfMemoryError`, a LoRA load error,
        :class:`RequestExpiredError` when not started by the deadline,
        :class:`InternalError`). Raises :class:`InvalidRequestError` for sizes or steps the
        pipeline would silently change, :class:`InternalError` once stopped; ``ValueError``
        for a job of several images (see :meth:`enqueue`)."""
        _check_single(job)
        return self._submit(job, placement).future

    def enqueue(self, job: ImageJob, placement: Placement = _ANY_OWNER) -> JobItem:
        """Like :meth:`submit`, for a job of up to ``max_batch_size`` images (more is an
        :class:`InvalidRequestError` naming ``num_images``), returning the queued item: its
        ``future`` (resolving to the image, or to the list of ``count`` images when
        ``count`` > 1), and ``withdraw()`` for a caller that decides itself what happens to
        abandoned work."""
        return self._submit(job, placement)

    async def generate(self, job: ImageJob, placement: Placement = _ANY_OWNER) -> Image:
        """The image for ``job`` (see :meth:`submit`). Cancelling the caller drops the job
        if it has not started yet; if it runs, its result is discarded, and the pipeline
        call stops at its next step when no job in it is still wanted."""
        _check_single(job)
        images = await self.generate_all(job, placement)
        return images[0]

    async def generate_all(self, job: ImageJob, placement: Placement = _ANY_OWNER
                           ) -> list[Image]:
        """The ``count`` images of ``job``, made in one pipeline call (see
        :meth:`generate`)."""
        item = self._submit(job, placement)
        try:
            result = await asyncio.wrap_future(item.future)
        except asyncio.CancelledError:
            item.withdraw()
            raise
        return result if isinstance(result, list) else [result]

    async def warm_up(self, job: ImageJob) -> list[Image]:
        """Make ``job``'s images before the worker serves anyone (a compiled model compiles
        its graphs in its first calls; see :mod:`core.image.warmup`), like
        :meth:`generate_all`, but unseen by metrics: no request asked for them. Call it
        only while nothing else is queued (work running meanwhile would go uncounted too).
        Raises what :meth:`generate_all` raises."""
        self._observed = False
        try:
            return await self.generate_all(job)
        finally:
            self._observed = True

    def submit_exclusive(self, fn: Callable[[Any], T],
                         placement: Placement = _ANY_OWNER) -> Future[T]:
        """Queue ``fn(pipeline)`` to run in the worker thread between jobs, where
        ``placement`` puts it (a training names itself as owner, so that it takes turns
        with conversations); past the deadline it fails with :class:`RequestExpiredError`
        instead."""
        future: Future[T] = Future()
        self._put(ExclusiveItem(fn, future, placement))
        return future

    async def run_exclusive(self, fn: Callable[[Any], T],
                            placement: Placement = _ANY_OWNER) -> T:
        """Run ``fn(pipeline)`` in the worker thread between jobs and return its result;
        its exceptions are raised here (torch's out of memory as
        :class:`OutOfMemoryError`). ``fn`` must leave the pipeline's LoRA adapters as it
        found them (use its own adapter name and delete it); otherwise the worker unloads
        all adapters afterwards."""
        return await asyncio.wrap_future(self.submit_exclusive(fn, placement))

    def _submit(self, job: ImageJob, placement: Placement) -> JobItem:
        _check_job(job)
        if job.count > self._max_images:  # (ImageService refuses it first, naming the field)
            raise InvalidRequestError(
                f"num_images: at most MAX_BATCH_SIZE={self._max_images} images per job, "
                f"got {job.count}", field="num_images")
        item = JobItem(job, Future(), placement)
        self._put(item)
        return item

    def _put(self, item: JobItem | ExclusiveItem) -> None:
        with self._lock:
            if self._closed:
                raise InternalError(_STOPPED)
            self._queue.put(item)

    # --- the worker thread ---

    def _serve(self) -> None:
        logger.info("GPU worker started (%s on %s)", self._model.name, self._model.device)
        while not self._abort.is_set():
            work = self._queue.take(self._max_batch, self._window_s)
            if isinstance(work, StopItem):
                break
            self._busy_since = time.monotonic()
            try:
                if isinstance(work, ExclusiveItem):
                    self._run_exclusive(work)
                else:
                    self._run_batch(work)
            except Exception as exc:
                # (a failed adapter resync, freeing memory): its callers get the error, the
                # worker goes on serving the others
                logger.exception("GPU worker: an item failed outside its own handling")
                items = [work] if isinstance(work, ExclusiveItem) else work
                for item in items:
                    if not item.future.done():
                        item.future.set_exception(_translate(exc))
            finally:
                self._busy_since = None
        self._fail_queued()
        logger.info("GPU worker stopped")

    def _run_batch(self, items: list[JobItem]) -> None:
        live = [item for item in items if item.future.set_running_or_notify_cancel()]
        if not live:
            return
        for item in live:
            _report_start(item.placement)
        try:
            results = self._generate(live)
        except Exception as exc:  # noqa: BLE001 - every failure must reach the callers
            results = list(_copies(_translate(exc), len(live)))
        # the GPU work is done: idle before any caller hears of it (its pulse says so)
        self._busy_since = None
        for item, result in zip(live, results):
            if item.future.done():  # defensive: a running future is ours alone to resolve
                continue
            if isinstance(result, BaseException):
                item.future.set_exception(result)
            else:  # see enqueue(): one image alone, several as a list
                item.future.set_result(result[0] if item.job.count == 1 else result)

    def _generate(self, items: list[JobItem]) -> list[list[Image] | EngineError]:
        """The images or an error per item; :class:`AllCancelled` and others from the
        batched call pass through (they concern every item alike)."""
        try:
            return list(self._attempt(items))
        except torch.OutOfMemoryError as exc:
            text = _oom_text(exc)
        # out of the except block: torch's error and the failed call's frames are gone
        self._recover(text, [item.job for item in items])
        return [self._alone(item) for item in items]  # once more, each alone

    def _alone(self, item: JobItem) -> list[Image] | EngineError:
        """The second and last attempt at ``item``'s job, alone."""
        job = item.job
        if item.cancelled.is_set():
            return _translate(AllCancelled("withdrawn before its retry"))
        try:
            return self._attempt([item])[0]
        except torch.OutOfMemoryError as exc:
            text = _oom_text(exc)
        except Exception as exc:  # noqa: BLE001 - reported to that job's caller
            return _translate(exc)
        self._recover(text, [job])
        return GpuOutOfMemoryError(
            f"out of GPU memory for {job.count} {job.width}x{job.height} image(s) with "
            f"{job.steps} steps, even alone ({_GPU_ATTEMPTS} attempts): {text}"
        )

    def _attempt(self, items: list[JobItem]) -> list[list[Image]]:
        jobs = [item.job for item in items]
        first = jobs[0]
        self._adapters.activate_all(first.adapters)
        self._set_tiling(decoded_in_tiles(first.width, first.height, self._tiling_threshold))
        if self._oom_injector is not None:
            self._oom_injector(jobs)
        self._model.before_call(first.denoising_steps)  # a step cache starts afresh
        started = time.perf_counter()
        image_to_image = first.init_image is not None
        pipeline = self._img2img.pipeline if image_to_image else self._model.pipeline
        images = call_pipeline(pipeline, jobs,
                               max_sequence_length=self._max_sequence_length, abort=self._abort,
                               cancelled=[item.cancelled for item in items])
        if self._metrics is not None and self._observed:  # once per call that made images
            self._metrics.image_batch_size.observe(sum(job.count for job in jobs))
            self._metrics.image_batch_seconds.observe(time.perf_counter() - started)
        if image_to_image and self._model.memory_mode == "model_offload":
            # the offload hooks belong to the text-to-image pipeline: let it put every
            # model back on the CPU, as its own calls do at their end
            self._model.pipeline.maybe_free_model_hooks()
        return images

    def _when_observed(self, observe: Callable[[float], None]) -> Callable[[float], None]:
        def maybe(value: float) -> None:
            if self._observed:
                observe(value)
        return maybe

    def _set_tiling(self, on: bool) -> None:
        if on != self._tiling:
            vae = self._model.pipeline.vae
            if on:
                vae.enable_tiling()
            else:
                vae.disable_tiling()
            self._tiling = on

    def _recover(self, text: str, jobs: list[ImageJob]) -> None:
        logger.warning("out of GPU memory with a batch of %d (%dx%d, %d steps): %s",
                       len(jobs), jobs[0].width, jobs[0].height, jobs[0].steps, text)
        if self._metrics is not None:
            self._metrics.image_oom.inc()
        _free_memory(self._model.pipeline)

    def _run_exclusive(self, item: ExclusiveItem) -> None:
        if not item.future.set_running_or_notify_cancel():
            return
        _report_start(item.placement)
        text: str | None = None
        try:
            result = item.fn(self._model.pipeline)
        except torch.OutOfMemoryError as exc:
            text = _oom_text(exc)
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller
            item.future.set_exception(exc)
        else:
            item.future.set_result(result)
        finally:
            self._tiling = None  # foreign code may have changed it
            self._adapters.resync()
        if text is not None:  # freed once the failed call's frames are gone
            _free_memory(self._model.pipeline)
            item.future.set_exception(
                OutOfMemoryError(f"out of GPU memory in an exclusive call: {text}"))

    def _fail_queued(self) -> None:
        for item in self._queue.drain():
            if isinstance(item, StopItem) or item.future.done():
                continue
            if item.future.set_running_or_notify_cancel():
                item.future.set_exception(InternalError(
                    f"{_STOPPED}: the job was not run (stopped before its turn)"
                ))


def _translate(exc: BaseException) -> EngineError:
    """Engine errors pass; anything else becomes :class:`InternalError`, keeping its cause."""
    if isinstance(exc, EngineError):
        return exc
    if isinstance(exc, Aborted):
        error: EngineError = InternalError(f"{_STOPPED}: generation was cut short")
    elif isinstance(exc, AllCancelled):
        error = RequestCancelledError(f"cancelled by its caller: {exc}")
    else:
        error = InternalError(f"image generation failed: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


def _oom_text(exc: BaseException) -> str:
    """Torch's out-of-memory message; the error lets go of its traceback (the failed
    call's frames and, through them, its tensors) and of its chained errors."""
    text = str(exc) or type(exc).__name__
    exc.__traceback__ = None
    exc.__cause__ = exc.__context__ = None
    return text


def _report_start(placement: Placement) -> None:
    try:
        placement.started()
    except Exception:  # a metrics problem must not kill the worker thread
        logger.exception("placement start callback failed")


def _copies(error: EngineError, count: int) -> list[EngineError]:
    """One exception object per future: a shared one would collect every raiser's
    traceback."""
    errors = [error]
    for _ in range(count - 1):
        twin = copy.copy(error)
        twin.__cause__ = error.__cause__
        errors.append(twin)
    return errors


def _free_memory(pipeline: Any) -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        pipeline.maybe_free_model_hooks()  # puts offloaded models back where they belong
    except Exception:
        logger.exception("freeing model hooks after out of memory")


def _check_settings(
    model: LoadedModel, max_batch_size: int, batch_window_ms: int, vae_tiling_threshold: int,
    max_sequence_length: int,
) -> None:
    if max_batch_size < 1:
        raise ValueError(f"MAX_BATCH_SIZE must be >= 1, got {max_batch_size}")
    if batch_window_ms < 0:
        raise ValueError(f"BATCH_WINDOW_MS must be >= 0, got {batch_window_ms}")
    if vae_tiling_threshold < 1:
        raise ValueError(f"VAE_TILING_THRESHOLD must be >= 1, got {vae_tiling_threshold}")
    tokenizer = getattr(model.pipeline, "tokenizer_2", None)
    limit = min(512, int(getattr(tokenizer, "model_max_length", 512)))
    if not 1 <= max_sequence_length <= limit:
        raise ValueError(
            f"FLUX_MAX_SEQUENCE_LENGTH must be between 1 and {limit} for {model.name} "
            f"(its T5 tokenizer's limit), got {max_sequence_length}"
        )


def _images_of(job: ImageJob) -> int:
    return job.count


def _check_single(job: ImageJob) -> None:
    if job.count != 1:
        raise ValueError(f"a job of {job.count} images: use enqueue() or generate_all()")


def _check_job(job: ImageJob) -> None:
    # FluxPipeline silently rounds sizes down to multiples of 16: refuse instead
    for name, value in (("width", job.width), ("height", job.height)):
        if value < 16 or value % 16:
            raise InvalidRequestError(f"{name} must be a positive multiple of 16, got {value}",
                                      field=name)
    if job.steps < 1:
        raise InvalidRequestError(f"steps must be >= 1, got {job.steps}",
                                  field="num_inference_steps")
    if job.count < 1:
        raise InvalidRequestError(f"count must be >= 1, got {job.count}", field="num_images")
    if job.init_image is not None:
        if job.init_image.size != (job.width, job.height):
            raise InvalidRequestError(
                f"init image is {job.init_image.size[0]}x{job.init_image.size[1]}, the job "
                f"{job.width}x{job.height}", field="init_image")
        if job.denoising_steps < 1:  # the pipeline would raise deep inside
            raise InvalidRequestError(
                f"strength {job.strength} leaves none of {job.steps} steps", field="strength")
