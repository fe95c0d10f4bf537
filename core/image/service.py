"""The one core entry for images, used by Kafka and HTTP alike.

request → checked params → LoRA looked up (UNKNOWN_LORA before the queue) → remembered
result? → prompt (LLM or rules, trigger word kept) → GPU worker → PNG with its parameters.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from PIL import Image

from core.image.job import ImageJob
from core.image.params import ImageLimits, ImageParams, resolve_params
from core.image.png import write_png
from core.image.prompts import PromptOptimizer
from core.image.results import CachedResult, ResultCache, fingerprint
from core.image.worker import GpuWorker
from core.lora.registry import LoraInfo, LoraRegistry
from core.outputs import OutputStore
from core.scheduling import Placement
from core.scheduling.gpu_queue import JobItem
from schemas.events import ImageRequested

__all__ = ["ImageResult", "ImageService", "ModelIdentity"]

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], Awaitable[None]]


@dataclass(frozen=True)
class ModelIdentity:
    name: str
    development_model: bool
    fingerprint: str


@dataclass(frozen=True)
class ImageResult:
    """The original API's response fields, plus the seed and the model."""

    image_id: str
    filename: str
    prompt: str
    width: int
    height: int
    url: str
    seed: int
    timestamp: str
    model: str
    development_model: bool


class ImageService:
    def __init__(
        self,
        worker: GpuWorker,
        loras: LoraRegistry,
        store: OutputStore,
        optimizer: PromptOptimizer,
        results: ResultCache,
        limits: ImageLimits,
        model: ModelIdentity,
        *,
        true_cfg_scale: float = 4.0,
        progress_interval: float = 0.5,
    ) -> None:
        self._worker = worker
        self._loras = loras
        self._store = store
        self._optimizer = optimizer
        self._results = results
        self._limits = limits
        self.model = model
        self._true_cfg_scale = true_cfg_scale
        self._progress_interval = progress_interval
        self._making: dict[str, _Making] = {}  # fingerprint → the image being made

    def check(self, request: ImageRequested) -> tuple[ImageParams, LoraInfo | None]:
        """Validates a request without generating: raises ``InvalidRequestError`` or
        ``UnknownLoraError`` (so callers can reject before queueing)."""
        params = resolve_params(request, self._limits)
        lora = self._loras.get(params.lora_id) if params.lora_id else None
        return params, lora

    async def generate(self, request: ImageRequested, progress: Progress | None = None,
                       placement: Placement | None = None) -> ImageResult:
        """Makes (or finds) the image for ``request``, queued on the GPU as ``placement``
        says (interactive, its own owner, when absent).

        The same image asked for while it is being made (a redelivery after a revoke, a
        duplicate) joins the making instead of computing it twice. Raises
        ``InvalidRequestError`` (a field), ``UnknownLoraError``, ``OutOfMemoryError``,
        ``RequestExpiredError`` (its deadline passed in the GPU queue) or
        ``InternalError``; never a partial file. Cancelling the caller drops a queued job;
        a running one is stopped at its next step, unless ``placement.keep_when_abandoned``
        says the request will come again: then it finishes into the result cache.
        """
        params, lora = self.check(request)
        key = fingerprint(params, self.model.fingerprint, lora.fingerprint if lora else None)
        remembered = self._results.get(key)
        if remembered is not None and self._store.exists(remembered.filename):
            logger.debug("request_id=%s answered from the result cache", request.request_id)
            return self._result(remembered)
        placement = placement or Placement(owner=request.conversation_id)
        making = self._live_making(key)
        if making is not None:
            logger.info("request_id=%s joins the same image being made", request.request_id)
            return self._result(await self._wait(making, placement))
        if remembered is not None:
            prompt = remembered.prompt  # regenerate exactly what was made before
        else:
            optimized = await self._optimizer.optimize(
                params.prompt, lora.trigger_word if lora else None, params.optimize_prompt)
            prompt = optimized.prompt
            making = self._live_making(key)  # made meanwhile by a twin?
            if making is not None:
                return self._result(await self._wait(making, placement))
        bridge = self._bridge(progress)
        job = ImageJob(
            prompt=prompt, negative_prompt=params.negative_prompt, width=params.width,
            height=params.height, steps=params.steps, guidance=params.guidance,
            true_cfg_scale=self._true_cfg_scale if params.negative_prompt else 1.0,
            seed=params.seed, lora=lora,
            progress=bridge.on_step,
        )
        making = _Making(key, self._worker.enqueue(job, placement))
        making.task = asyncio.create_task(
            self._make(making, key, params, prompt, lora, request.request_id))
        self._making[key] = making
        making.task.add_done_callback(lambda _: self._ended(making))
        try:
            entry = await self._wait(making, placement)
        except asyncio.CancelledError:
            bridge.abandon()
            raise
        except Exception:
            await bridge.finish()
            raise
        await bridge.finish()
        return self._result(entry)

    async def _make(self, making: _Making, key: str, params: ImageParams, prompt: str,
                    lora: LoraInfo | None, request_id: str) -> CachedResult:
        """The GPU job, then its PNG and result-cache entry; owned by the service, so that
        it can outlive the callers that asked for it."""
        try:
            image = await asyncio.wrap_future(making.item.future)
        except asyncio.CancelledError:
            making.item.withdraw()
            raise
        return await asyncio.to_thread(self._keep, key, image, params, prompt, lora,
                                       request_id)

    async def _wait(self, making: _Making, placement: Placement) -> CachedResult:
        """One caller's wait for ``making``; the last caller to leave decides whether the
        work goes on (see :meth:`generate`)."""
        assert making.task is not None
        if making.item.future.running() or making.item.future.done():
            placement.started()  # joined work that already runs
        making.waiters += 1
        try:
            return await asyncio.shield(making.task)
        except asyncio.CancelledError:
            if making.waiters == 1 and not making.task.done():
                keep = placement.keep_when_abandoned
                if making.item.future.running() and keep is not None and keep():
                    logger.info("an abandoned image keeps running: it lands in the result "
                                "cache for the request's next delivery")
                else:
                    self._forget(making)  # no twin may join work that is being stopped
                    making.task.cancel()
            raise
        finally:
            making.waiters -= 1

    def _live_making(self, key: str) -> _Making | None:
        making = self._making.get(key)
        if making is None or making.task is None or making.task.done() \
                or making.task.cancelling():
            return None
        return making

    def _forget(self, making: _Making) -> None:
        if self._making.get(making.key) is making:
            del self._making[making.key]

    def _ended(self, making: _Making) -> None:
        self._forget(making)
        task = making.task
        if task is not None and not task.cancelled() and task.exception() is not None \
                and making.waiters == 0:
            logger.warning("an abandoned image failed: %s", task.exception())

    def _keep(self, key: str, image: Image.Image, params: ImageParams, prompt: str,
              lora: LoraInfo | None, request_id: str) -> CachedResult:
        """Writes the PNG and remembers it (file I/O: runs off the event loop)."""
        parameters = {
            "prompt": prompt, "negative_prompt": params.negative_prompt, "seed": params.seed,
            "steps": params.steps, "guidance_scale": params.guidance,
            "width": params.width, "height": params.height,
            "lora": lora.lora_id if lora else None,
            "trigger_word": lora.trigger_word if lora else None,
            "model": self.model.name, "development_model": self.model.development_model,
            "request_id": request_id,
        }
        stored = self._store.write_with(lambda path: write_png(path, image, parameters), "png")
        entry = CachedResult(stored.file_id, stored.filename, prompt, params.width,
                             params.height, params.seed)
        self._results.put(key, entry)
        return entry

    def _result(self, entry: CachedResult) -> ImageResult:
        return ImageResult(
            image_id=entry.image_id, filename=entry.filename, prompt=entry.prompt,
            width=entry.width, height=entry.height, url=self._store.url_for(entry.filename),
            seed=entry.seed, timestamp=_now(), model=self.model.name,
            development_model=self.model.development_model,
        )

    def _bridge(self, progress: Progress | None) -> _ProgressBridge:
        """Worker-thread step callbacks → throttled progress coroutines on this loop, in
        order (one task drains them)."""
        return _ProgressBridge(progress, self._progress_interval)


class _ProgressBridge:
    """``on_step`` (worker thread) → ``progress`` (this loop), throttled, in order.
    ``finish()`` waits until all were published, so the completed event always comes
    after the last progress event; ``abandon()`` stops publishing at once (the caller is
    gone: nothing may wait on a broker that may be gone too)."""

    def __init__(self, progress: Progress | None, interval: float) -> None:
        self._progress = progress
        self._interval = interval
        self._last = 0.0
        self._queue: asyncio.Queue[tuple[int, int] | None] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._drain()) if progress is not None else None

    @property
    def on_step(self) -> Callable[[int, int], None] | None:
        return self._on_step if self._progress is not None else None

    def _on_step(self, step: int, total: int) -> None:
        now = time.monotonic()
        if step < total and now - self._last < self._interval:
            return
        self._last = now
        self._loop.call_soon_threadsafe(self._queue.put_nowait, (step, total))

    async def _drain(self) -> None:
        assert self._progress is not None
        while (item := await self._queue.get()) is not None:
            try:
                await self._progress(*item)
            except Exception:  # progress is best effort; the result is what counts
                logger.warning("progress event not published", exc_info=True)

    async def finish(self) -> None:
        if self._task is not None:
            self._queue.put_nowait(None)
            await self._task

    def abandon(self) -> None:
        if self._task is not None:
            self._task.cancel()


@dataclass(eq=False)
class _Making:
    """An image being made: its GPU job, the task that makes and keeps it, and how many
    callers wait for it."""

    key: str
    item: JobItem
    task: asyncio.Task[CachedResult] | None = None
    waiters: int = 0


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z"
