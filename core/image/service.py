"""The one core entry for images, used by Kafka and HTTP alike.

request → checked params → LoRAs looked up (UNKNOWN_LORA before the queue) → starting
image fetched and decoded (image-to-image) → remembered result? → prompt (LLM or rules,
trigger word kept) → GPU worker (``num_images`` images in one call) → files (PNG, JPEG or
WebP) with their parameters.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

from core.answers import Answers
from core.image.files import SUFFIXES, write_image
from core.image.init_image import InitImageLimits, InitImageLoader, decode_init_image
from core.image.job import ActiveLora, ImageJob
from core.image.params import ImageLimits, ImageParams, resolve_params, size_for_init
from core.image.prompts import PromptOptimizer
from core.image.results import CachedResult, Rendering, ResultCache, fingerprint
from core.image.worker import GpuWorker
from core.lora.adapters import IncompatibleLoraError
from core.lora.registry import LoraInfo, LoraRegistry
from core.outputs import OutputStore, StoredFile
from core.remembered import looked_up
from core.scheduling import Placement
from core.scheduling.gpu_queue import JobItem
from core.scheduling.placement import JointPlacement
from core.shared_work import Keeper, SharedWork
from core.storage import StorageError, unavailable
from schemas.errors import EngineError, InternalError, InvalidRequestError, UnknownLoraError
from schemas.events import ImageRequested

__all__ = ["CheckedRequest", "ImageFile", "ImageResult", "ImageService", "ModelIdentity",
           "UnknownStackedLoraError"]

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], Awaitable[None]]
_DECODING_AT_ONCE = 2  # starting images decoded at once (each up to LORA_MAX_IMAGE_PIXELS)


@dataclass(frozen=True)
class ModelIdentity:
    name: str
    development_model: bool
    fingerprint: str


class UnknownStackedLoraError(UnknownLoraError):
    """``UNKNOWN_LORA`` for an id of ``loras``; ``field`` names it (``loras.1.lora_id``)."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class CheckedRequest:
    """A request that passed every check that needs no download: its parameters, its
    character LoRA (None without one) and the LoRAs stacked on it, with their scales."""

    params: ImageParams
    lora: LoraInfo | None
    stacked: tuple[ActiveLora, ...]


@dataclass(frozen=True)
class ImageFile:
    """One image of a request that made several."""

    image_id: str
    filename: str
    url: str
    seed: int


@dataclass(frozen=True)
class ImageResult:
    """The original API's response fields (of the first image), plus the seed and the
    model; ``images`` lists every image when the request made several (else empty)."""

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
    images: tuple[ImageFile, ...] = ()


class ImageService:
    """Image requests made on ``worker``'s model, named by ``model`` (its weights'
    fingerprint keys the result cache).

    ``true_cfg_scale`` (TRUE_CFG_SCALE) applies to requests with a negative prompt; with
    the worker's FLUX_MAX_SEQUENCE_LENGTH and VAE_TILING_THRESHOLD and its model's device,
    dtype, attention kernel and speed settings, it keys the result cache
    (:class:`~core.image.results.Rendering`), so that other settings never replay other
    pixels. ``answers`` records which request ids were answered with which result (none:
    :meth:`remembered` finds nothing).
    """

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
        init_images: InitImageLoader | None = None,
        answers: Answers | None = None,
    ) -> None:
        self._worker = worker
        self._loras = loras
        self._store = store
        self._optimizer = optimizer
        self._results = results
        self._answers = answers
        self._limits = limits
        self.model = model
        self._true_cfg_scale = true_cfg_scale
        loaded = worker.model
        self._rendering = Rendering(
            device=loaded.device, dtype=loaded.dtype_name,
            attention_backend=loaded.attention_backend, acceleration=loaded.acceleration.key,
            max_sequence_length=worker.max_sequence_length, true_cfg_scale=true_cfg_scale,
            vae_tiling_threshold=worker.vae_tiling_threshold)
        self._progress_interval = progress_interval
        self._making: SharedWork[CachedResult] = SharedWork("image")  # by fingerprint
        self._jobs: dict[str, JobItem] = {}  # fingerprint → the GPU job of that work
        self._joints: dict[str, JointPlacement] = {}  # fingerprint → its callers' placement
        self._init_images = init_images or InitImageLoader(None, InitImageLimits())
        self._decoding = asyncio.Semaphore(_DECODING_AT_ONCE)  # bounds decoded pixels held

    @property
    def loras(self) -> LoraRegistry:
        """The LoRA registry this service draws from (trainings register into it)."""
        return self._loras

    def check(self, request: ImageRequested) -> CheckedRequest:
        """Validates a request without generating or downloading anything: raises
        ``InvalidRequestError`` (naming the field) or ``UnknownLoraError`` (so callers
        can reject before queueing)."""
        params = resolve_params(request, self._limits)
        lora = self._loras.get(params.lora_id) if params.lora_id else None
        stacked = tuple((self._stacked_lora(index, lora_id), scale)
                        for index, (lora_id, scale) in enumerate(params.loras))
        if self._worker.model.hotswap_slot is not None:
            _check_compiled(params, lora, stacked)
        return CheckedRequest(params, lora, stacked)

    def _stacked_lora(self, index: int, lora_id: str) -> LoraInfo:
        try:
            return self._loras.get(lora_id)
        except UnknownLoraError as exc:
            raise UnknownStackedLoraError(f"loras.{index}.lora_id: {exc.message}",
                                          f"loras.{index}.lora_id") from exc

    async def generate(self, request: ImageRequested, progress: Progress | None = None,
                       placement: Placement | None = None) -> ImageResult:
        """Makes (or finds) the image for ``request``, queued on the GPU as ``placement``
        says (interactive, its own owner, when absent).

        The same image asked for while it is being made (a redelivery after a revoke, a
        duplicate) joins the making instead of computing it twice, and starts with it:
        ``placement.on_start`` is called when the GPU takes that job (at once when it
        already has), whoever queued it. The job is queued for all of them
        (:class:`~core.scheduling.placement.JointPlacement`): interactive once one is, and
        expired only past the latest of their deadlines. A remembered result is
        answered only while its files have a useful life left
        (:data:`~core.remembered.MIN_USEFUL_LIFE_S`); otherwise it is made again, the same
        pixels under new names. Raises ``InvalidRequestError`` (a field; for a LoRA not
        made for this model, ``IncompatibleLoraError`` naming the field that named it,
        the model untouched), ``UnknownLoraError``, ``OutOfMemoryError``,
        ``RequestExpiredError`` (its deadline passed in the GPU queue) or
        ``InternalError``; never a partial file. Cancelling the caller drops a queued job;
        a running one is stopped at its next step, unless ``placement.keep_when_abandoned``
        keeps it (the request will come again): then it finishes into the result cache,
        or stops at its next step once that keeper is dropped (the request cancelled).
        """
        if self._loras.shared is not None:  # LoRAs registered elsewhere: fetched off the loop
            await asyncio.to_thread(self._loras.fetch, _named_loras(request))
        checked = self.check(request)
        lora, stacked = checked.lora, checked.stacked
        params, init, init_hash, key = await self._keyed(checked)
        remembered, current = await self._looked_up(key)
        if remembered is not None and current:
            logger.debug("request_id=%s answered from the result cache", request.request_id)
            await self._recorded(request, key)
            return self._result(remembered)
        placement = placement or Placement(owner=request.conversation_id)
        bridge: _ProgressBridge | None = None
        joint = self._joint(key)

        async def make() -> CachedResult:  # when this caller starts the work
            nonlocal bridge
            # the GPU taking the job starts every caller attached, twins that joined too;
            # their placements, joined, place it
            queued = replace(placement, on_start=self._making.start_signal(key),
                             promotion=joint.promotion, joint=joint)
            prompt = await self._prompt(params, lora, remembered)
            bridge = self._bridge(progress)
            job = ImageJob(
                prompt=prompt, negative_prompt=params.negative_prompt, width=params.width,
                height=params.height, steps=params.steps, guidance=params.guidance,
                true_cfg_scale=self._true_cfg_scale if params.negative_prompt else 1.0,
                seed=params.seed, lora=lora, lora_scale=params.lora_scale,
                extra_loras=stacked, count=params.num_images, init_image=init,
                strength=params.strength, progress=bridge.on_step,
            )
            kept = _Kept(params, prompt, lora, stacked, init_hash, request.request_id,
                         job.seeds)
            return await self._make(key, job, queued, kept)

        keeper = placement.keep_when_abandoned
        token = joint.join(placement)
        try:
            entry = await self._making.run(
                key, make, keep_when_abandoned=None if keeper is None
                else _WhileRunning(keeper, lambda: self._running(key)),
                on_start=placement.on_start)
        except asyncio.CancelledError:
            if bridge is not None:
                bridge.abandon()
            raise
        except Exception:
            if bridge is not None:
                await bridge.finish()
            raise
        finally:
            joint.leave(token)
            self._forget(key, joint)
        if bridge is not None:
            await bridge.finish()
        await self._recorded(request, key)
        return self._result(entry)

    async def remembered(self, request: ImageRequested) -> ImageResult | None:
        """The result :meth:`generate` answered ``request`` with before (its
        ``request_id``, the same content), from the result cache (same files, same URLs),
        found without the GPU, the prompt optimizer or a download; ``None`` when there is
        none (a new request with the same content included), or when its key would need
        one: a starting image at ``init_image_url``, a LoRA not fetched here yet. An
        invalid request has none either (no error raised)."""
        if request.init_image_url is not None or self._answers is None:
            return None
        try:
            _, _, _, key = await self._keyed(self.check(request))
        except EngineError:
            return None
        if not await self._answers.answered_with(request.request_id, key):
            return None
        remembered, current = await self._looked_up(key)
        return self._result(remembered) if remembered is not None and current else None

    async def _keyed(self, checked: CheckedRequest
                     ) -> tuple[ImageParams, Image.Image | None, str | None, str]:
        """The parameters (sized by the starting image), the starting image and its
        sha256, and the result-cache key of a checked request."""
        params, lora, stacked = checked.params, checked.lora, checked.stacked
        init: Image.Image | None = None
        init_hash: str | None = None
        if params.image_to_image:
            params, init, init_hash = await self._starting_image(params)
        key = fingerprint(params, self.model.fingerprint, lora.fingerprint if lora else None,
                          rendering=self._rendering,
                          stacked_hashes=tuple(info.fingerprint for info, _ in stacked),
                          init_hash=init_hash)
        return params, init, init_hash, key

    async def _recorded(self, request: ImageRequested, key: str) -> None:
        if self._answers is not None:  # before the caller publishes it: durably
            await self._answers.record(request.request_id, key)

    async def _looked_up(self, key: str) -> tuple[CachedResult | None, bool]:
        return await looked_up(self._results.get, self._store, key, _filenames,
                               shared=self._results.shared or self._store.shared is not None)

    async def _prompt(self, params: ImageParams, lora: LoraInfo | None,
                      remembered: CachedResult | None) -> str:
        if remembered is not None:
            return remembered.prompt  # regenerate exactly what was made before
        # a LoRA at scale 0 is left out, its trigger word too: the base model's image
        trigger = lora.trigger_word if lora is not None and params.lora_scale > 0 else None
        optimized = await self._optimizer.optimize(params.prompt, trigger,
                                                   params.optimize_prompt)
        return optimized.prompt

    async def _starting_image(self, params: ImageParams
                              ) -> tuple[ImageParams, Image.Image, str]:
        """The starting image's bytes (inline or fetched), decoded and brought to the
        request's size (the image's own when none was given): the parameters with that
        size, the image, and the sha256 of its bytes."""
        if params.init_image is not None:
            data, field = params.init_image, "init_image"
        else:
            assert params.init_image_url is not None
            data, field = await self._init_images.fetch(params.init_image_url), "init_image_url"
        async with self._decoding:
            return await asyncio.to_thread(self._prepare_start, params, data, field)

    def _prepare_start(self, params: ImageParams, data: bytes, field: str
                       ) -> tuple[ImageParams, Image.Image, str]:
        decoded = decode_init_image(data, field, self._init_images.limits)
        params = size_for_init(params, decoded.image.size, self._limits)
        image = decoded.image
        if image.size != (params.width, params.height):
            image = image.resize((params.width, params.height), Image.Resampling.LANCZOS)
        return params, image, decoded.sha256

    async def _make(self, key: str, job: ImageJob, placement: Placement,
                    kept: _Kept) -> CachedResult:
        """The GPU job, then its files and result-cache entry; shared work (see
        :meth:`generate`), so that it can outlive the callers that asked for it."""
        item = self._worker.enqueue(job, placement)
        self._jobs[key] = item
        try:
            try:
                result = await asyncio.wrap_future(item.future)
            except asyncio.CancelledError:
                item.withdraw()
                raise
            except IncompatibleLoraError as exc:  # the worker knows the LoRA, not the field
                raise exc.naming(_field_naming(exc.lora_id, kept)) from exc
            images = result if isinstance(result, list) else [result]
            try:
                return await asyncio.to_thread(self._keep, key, images, kept)
            except StorageError as exc:  # the store comes back: the request may retry
                raise unavailable(exc) from exc
            except OSError as exc:
                logger.warning("request_id=%s: image files not written: %s",
                               kept.request_id, exc)
                raise InternalError("cannot write the image files") from exc
        finally:
            if self._jobs.get(key) is item:
                del self._jobs[key]
            if placement.joint is not None and self._joints.get(key) is placement.joint:
                del self._joints[key]  # the work ends: a caller from now on starts anew

    def _joint(self, key: str) -> JointPlacement:
        """The placement of the work for ``key`` that a caller would join now, or a new one
        for the work it would start (:meth:`SharedWork.run` decides the same way)."""
        joint = self._joints.get(key)
        if joint is None or not self._making.running(key):
            joint = self._joints[key] = JointPlacement()
        return joint

    def _forget(self, key: str, joint: JointPlacement) -> None:
        """Drops ``joint`` once its work is over (or dying)."""
        if self._joints.get(key) is joint and not self._making.running(key):
            del self._joints[key]

    def _running(self, key: str) -> bool:
        """Whether the GPU job of the work for ``key`` runs (taken off the queue)."""
        item = self._jobs.get(key)
        return item is not None and item.future.running()

    def _keep(self, key: str, images: list[Image.Image], kept: _Kept) -> CachedResult:
        """Writes the files and remembers them (file I/O: runs off the event loop). All
        files or none: when one cannot be written, those already written are removed and
        the ``OSError`` is raised. A result that cannot be remembered is only logged: the
        files are complete, a replay will just cost again."""
        params = kept.params
        files: list[StoredFile] = []
        try:
            for index, (image, seed) in enumerate(zip(images, kept.seeds, strict=True)):
                parameters = self._parameters(kept, seed, index, len(images))
                files.append(self._store.write_with(
                    functools.partial(_write, image=image, parameters=parameters,
                                      output_format=params.output_format,
                                      quality=params.output_quality),
                    SUFFIXES[params.output_format]))
        except BaseException:
            for stored in files:
                stored.path.unlink(missing_ok=True)
            raise
        listed = [{"image_id": stored.file_id, "filename": stored.filename, "seed": seed}
                  for stored, seed in zip(files, kept.seeds, strict=True)] \
            if len(files) > 1 else []
        entry = CachedResult(files[0].file_id, files[0].filename, kept.prompt, params.width,
                             params.height, params.seed, listed)
        try:
            self._results.put(key, entry)
        except OSError as exc:
            logger.warning("request_id=%s: image result not remembered: %s",
                           kept.request_id, exc)
        return entry

    def _parameters(self, kept: _Kept, seed: int, index: int, count: int
                    ) -> dict[str, object]:
        """What the file carries: the original fields, and the newer ones where they
        differ from their defaults (a plain request's PNG is as it always was)."""
        params, lora = kept.params, kept.lora
        active = lora is not None and params.lora_scale > 0
        return {
            "prompt": kept.prompt, "negative_prompt": params.negative_prompt, "seed": seed,
            "steps": params.steps, "guidance_scale": params.guidance,
            "width": params.width, "height": params.height,
            "lora": lora.lora_id if lora else None,
            "trigger_word": lora.trigger_word if lora is not None and active else None,
            "lora_scale": params.lora_scale if lora and params.lora_scale != 1.0 else None,
            "loras": ",".join(f"{info.lora_id}:{scale:g}" for info, scale in kept.stacked)
            or None,
            "init_image_sha256": kept.init_hash,
            "strength": params.strength if kept.init_hash is not None else None,
            "image_index": index if count > 1 else None,
            "num_images": count if count > 1 else None,
            "model": self.model.name, "development_model": self.model.development_model,
            "request_id": kept.request_id,
        }

    def _result(self, entry: CachedResult) -> ImageResult:
        images = tuple(
            ImageFile(str(image["image_id"]), str(image["filename"]),
                      self._store.url_for(str(image["filename"])), int(image["seed"]))
            for image in entry.images)
        return ImageResult(
            image_id=entry.image_id, filename=entry.filename, prompt=entry.prompt,
            width=entry.width, height=entry.height, url=self._store.url_for(entry.filename),
            seed=entry.seed, timestamp=_now(), model=self.model.name,
            development_model=self.model.development_model, images=images,
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


@dataclass(frozen=True)
class _WhileRunning:
    """``keeper``, asked only while the GPU job runs: abandoned work whose job is still
    queued is dropped (nothing spent on it yet)."""

    keeper: Keeper
    running: Callable[[], bool]

    def keeps(self) -> bool:
        return self.running() and self.keeper.keeps()

    async def dropped(self) -> None:
        await self.keeper.dropped()

    def released(self) -> None:
        self.keeper.released()


@dataclass(frozen=True)
class _Kept:
    """What the files of a made request are written with."""

    params: ImageParams
    prompt: str
    lora: LoraInfo | None
    stacked: tuple[ActiveLora, ...]
    init_hash: str | None
    request_id: str
    seeds: tuple[int, ...]  # one per image (ImageJob.seeds)


def _write(path: Path, *, image: Image.Image, parameters: dict[str, object],
           output_format: str, quality: int) -> None:
    write_image(path, image, parameters, output_format=output_format, quality=quality)


def _named_loras(request: ImageRequested) -> list[str]:
    named = [entry.lora_id.strip() for entry in request.loras or ()]
    return [request.character_lora_id.strip(), *named] if request.character_lora_id \
        else named


def _field_naming(lora_id: str, kept: _Kept) -> str:
    """The request field that named ``lora_id``: the character LoRA or one of ``loras``."""
    if kept.lora is None or kept.lora.lora_id != lora_id:
        for index, (info, _) in enumerate(kept.stacked):
            if info.lora_id == lora_id:
                return f"loras.{index}.lora_id"
    return "character_lora_id"


def _filenames(entry: CachedResult) -> list[str]:
    return [str(image["filename"]) for image in entry.images] or [entry.filename]


def _check_compiled(params: ImageParams, lora: LoraInfo | None,
                    stacked: tuple[ActiveLora, ...]) -> None:
    """A compiled model swaps one LoRA, at any scale, into its slot
    (core/lora/adapters.py): stacking would recompile it."""
    active = [scale for scale in ([params.lora_scale] if lora else []) if scale > 0]
    active += [scale for _, scale in stacked if scale > 0]
    if len(active) > 1:
        raise InvalidRequestError(
            "loras: this engine runs a compiled model (COMPILE_TRANSFORMER=true), which "
            "applies one LoRA per request; stacked LoRAs need COMPILE_TRANSFORMER=false",
            field="loras")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z"
