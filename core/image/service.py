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

        Raises ``InvalidRequestError`` (a field), ``UnknownLoraError``, ``OutOfMemoryError``,
        ``RequestExpiredError`` (its deadline passed in the GPU queue) or ``InternalError``;
        never a partial file. Cancelling the caller drops the job, or stops it at its next
        step when it runs.
        """
        params, lora = self.check(request)
        key = fingerprint(params, self.model.fingerprint, lora.fingerprint if lora else None)
        remembered = self._results.get(key)
        if remembered is not None and self._store.exists(remembered.filename):
            logger.debug("request_id=%s answered from the result cache", request.request_id)
            return self._result(remembered)
        if remembered is not None:
            prompt = remembered.prompt  # regenerate exactly what was made before
        else:
            optimized = await self._optimizer.optimize(
                params.prompt, lora.trigger_word if lora else None, params.optimize_prompt)
            prompt = optimized.prompt
        on_step, finish_progress = self._bridge(progress)
        job = ImageJob(
            prompt=prompt, negative_prompt=params.negative_prompt, width=params.width,
            height=params.height, steps=params.steps, guidance=params.guidance,
            true_cfg_scale=self._true_cfg_scale if params.negative_prompt else 1.0,
            seed=params.seed, lora=lora,
            progress=on_step,
        )
        try:
            image = await self._worker.generate(
                job, placement or Placement(owner=request.conversation_id))
        finally:
            await finish_progress()
        entry = await asyncio.to_thread(self._keep, key, image, params, prompt, lora,
                                        request.request_id)
        return self._result(entry)

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

    def _bridge(self, progress: Progress | None
                ) -> tuple[Callable[[int, int], None] | None, Callable[[], Awaitable[None]]]:
        """Worker-thread step callbacks → throttled progress coroutines on this loop, in
        order (one task drains them). ``finish()`` waits until all were published, so the
        completed event always comes after the last progress event."""
        if progress is None:
            async def nothing() -> None:
                return None
            return None, nothing
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, int] | None] = asyncio.Queue()
        last = [0.0]

        async def drain() -> None:
            while (item := await queue.get()) is not None:
                try:
                    await progress(*item)
                except Exception:  # progress is best effort; the result is what counts
                    logger.warning("progress event not published", exc_info=True)

        task = loop.create_task(drain())

        def on_step(step: int, total: int) -> None:
            now = time.monotonic()
            if step < total and now - last[0] < self._progress_interval:
                return
            last[0] = now
            loop.call_soon_threadsafe(queue.put_nowait, (step, total))

        async def finish() -> None:
            queue.put_nowait(None)
            await task

        return on_step, finish


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z"
