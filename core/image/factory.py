"""Building the image core from settings: model, GPU worker (warmed up), LoRAs, prompts,
results."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from pathlib import Path

import httpx

from core.answers import Answers
from core.health import EngineHealth
from core.image.acceleration import Acceleration
from core.image.compile_cache import CompileCache, Loaded, cache_name, kernel_cache_counts
from core.image.init_image import InitImageLimits, InitImageLoader
from core.image.loader import LoadedModel, ModelLoadError, load_pipeline
from core.image.params import ImageLimits
from core.image.prompts import PromptOptimizer
from core.image.results import ResultCache
from core.image.service import ImageService, ModelIdentity
from core.image.warmup import warm_up
from core.image.worker import GpuWorker
from core.llm import ChatClient
from core.lora.registry import LoraRegistry
from core.lora.shared import SharedLoras
from core.metrics import EngineMetrics
from core.net import AllowedHosts
from core.outputs import OutputStore
from core.remembered import RememberedResults
from core.settings import Settings
from core.storage import ObjectStore
from schemas.errors import EngineError

__all__ = ["acceleration_of", "build_image_service", "compile_cache_of", "init_image_limits",
           "model_fingerprint"]

logger = logging.getLogger(__name__)


def model_fingerprint(path: Path) -> str:
    """Identifies a model folder's content cheaply: its configs, and its weight files by
    name, size and modification time (hashing GBs of weights at start-up is not worth it)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        relative = file.relative_to(path).as_posix()
        digest.update(relative.encode())
        if file.suffix in (".json", ".txt"):
            digest.update(file.read_bytes())
        else:
            stat = file.stat()
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def acceleration_of(settings: Settings) -> Acceleration:
    return Acceleration(quantization=settings.quantization, step_cache=settings.step_cache,
                        threshold=settings.step_cache_threshold,
                        interval=settings.step_cache_interval)


async def build_image_service(
    settings: Settings, model_path: Path, store: OutputStore, http: httpx.AsyncClient,
    metrics: EngineMetrics, objects: ObjectStore | None = None,
    health: EngineHealth | None = None, fetch_http: httpx.AsyncClient | None = None,
) -> tuple[ImageService, GpuWorker]:
    """Loads the model at ``model_path`` (in a thread: real weights take minutes), starts
    its GPU worker and makes the warm-up images (:mod:`core.image.warmup`: with
    COMPILE_TRANSFORMER, the compilation), so that the service returned serves at full
    speed from its first request. ``health.warming`` (when given) is true meanwhile;
    ``objects``, the shared store, also keeps the result cache and the record of which
    requests it answered. ``http`` calls the Persona Engine; ``fetch_http`` (``http``
    when not given) fetches ``init_image_url`` (the engine's own takes no proxy).

    Raises ``ModelLoadError`` with what is missing or wrong, or when a warm-up image fails
    (the worker is stopped then)."""
    model: LoadedModel = await asyncio.to_thread(
        load_pipeline, model_path, device=settings.device, use_fp16=settings.use_fp16,
        memory_mode=settings.memory_mode, attention_backend=settings.attention_backend,
        compile_transformer=settings.compile_transformer,
        acceleration=acceleration_of(settings), fuse_qkv=settings.fuse_qkv,
    )
    worker = GpuWorker(
        model, max_batch_size=settings.max_batch_size, batch_window_ms=settings.batch_window_ms,
        lora_cache_size=settings.lora_cache_size,
        vae_tiling_threshold=settings.vae_tiling_threshold,
        max_sequence_length=settings.flux_max_sequence_length, metrics=metrics,
    )
    limits = ImageLimits(
        max_image_size=settings.max_image_size,
        max_inference_steps=settings.max_inference_steps,
        default_steps=settings.default_inference_steps,
        default_guidance=settings.default_guidance_scale,
        default_negative_prompt=settings.default_negative_prompt,
        max_loras=settings.max_loras_per_request,
        max_batch_size=settings.max_batch_size,
    )
    compile_cache = (compile_cache_of(settings, model, objects)
                     if model.compiled and settings.compile_cache != "off" else None)
    worker.start()
    try:
        await _warm(worker, limits, model_path, health, compile_cache)
    except BaseException:
        await asyncio.to_thread(worker.stop)
        raise
    llm = (ChatClient(http, settings.persona_engine_url, settings.persona_engine_model,
                      settings.persona_engine_timeout)
           if settings.persona_engine_url else None)
    # the weights; what else changes pixels (device, dtype, attention, fp8, step caches,
    # sequence length, true CFG, VAE tiling) the service adds to each result key
    fingerprint = await asyncio.to_thread(model_fingerprint, model_path)
    identity = ModelIdentity(model.name, model.development_model, fingerprint)
    service = ImageService(
        worker,
        LoraRegistry(settings.lora_output_dir,
                     shared=SharedLoras(objects) if objects is not None else None),
        store, PromptOptimizer(llm),
        ResultCache(RememberedResults(settings.output_dir / ".results",
                                      max_entries=settings.result_cache_max_entries,
                                      shared=objects, namespace="results/image")),
        limits, identity, true_cfg_scale=settings.true_cfg_scale,
        progress_interval=settings.progress_interval,
        init_images=InitImageLoader(fetch_http or http, init_image_limits(settings)),
        answers=Answers(RememberedResults(settings.output_dir / ".answers" / "image",
                                          max_entries=settings.result_cache_max_entries,
                                          shared=objects, namespace="results/answers/image")),
    )
    return service, worker


def compile_cache_of(settings: Settings, model: LoadedModel,
                     objects: ObjectStore | None) -> CompileCache:
    """The compiled model's kernels, kept in ``OUTPUT_DIR/.compile-cache`` and, with
    COMPILE_CACHE=shared, the shared store (:mod:`core.image.compile_cache`). Named by
    what shapes the kernels (the transformer's architecture, dtype, speed settings), not by
    the weights' values: two copies of one model share a blob."""
    architecture = json.dumps(dict(model.pipeline.transformer.config), sort_keys=True,
                              default=str)
    name = cache_name(device=model.device, model=architecture, options={
        "dtype": model.dtype_name, "acceleration": model.acceleration.key,
        "fused_qkv": model.fused_qkv, "attention_backend": model.attention_backend,
        "memory_mode": model.memory_mode})
    return CompileCache(name, settings.output_dir / ".compile-cache",
                        objects if settings.compile_cache == "shared" else None)


async def _warm(worker: GpuWorker, limits: ImageLimits, model_path: Path,
                health: EngineHealth | None, compile_cache: CompileCache | None) -> None:
    side = limits.default_side  # the size a request without one gets
    if health is not None:
        health.warming = True
    try:
        loaded = await asyncio.to_thread(compile_cache.load) if compile_cache else None
        hits, misses = kernel_cache_counts()
        try:
            await warm_up(worker, size=side - side % 16, max_batch_size=limits.max_batch_size,
                          guidance=limits.default_guidance)
        except Exception:
            if compile_cache is not None and loaded is not None and loaded.source:
                # the kernels loaded may be why: the next start compiles afresh
                await asyncio.to_thread(compile_cache.forget)
            raise
        if compile_cache is not None and loaded is not None:
            await _keep_kernels(compile_cache, loaded, kernel_cache_counts(), (hits, misses))
    except Exception as exc:  # the model cannot serve: say so at start-up, not per request
        why = exc.message if isinstance(exc, EngineError) else f"{type(exc).__name__}: {exc}"
        raise ModelLoadError(f"image model at {model_path} failed its warm-up: {why}",
                             path=model_path) from exc
    finally:
        if health is not None:
            health.warming = False


async def _keep_kernels(cache: CompileCache, loaded: Loaded, after: tuple[int, int],
                        before: tuple[int, int]) -> None:
    """Logs what the warm-up found cached; saves the kernels when none were loaded or
    the warm-up compiled new ones."""
    hits, misses = after[0] - before[0], after[1] - before[1]
    where = f"from {loaded.source} ({loaded.size} bytes)" if loaded.source else "none found"
    logger.info("compile cache %s: %s; %d of %d kernels found cached", cache.name, where,
                hits, hits + misses)
    if misses or loaded.source is None:
        size = await asyncio.to_thread(cache.save)  # never raises: a cache stops nothing
        logger.info("compile cache %s: %d kernels compiled here, saved (%d bytes)",
                    cache.name, misses, size)


def init_image_limits(settings: Settings) -> InitImageLimits:
    """Starting images follow the rules of LoRA training images (size, pixels, fetch)."""
    return InitImageLimits(
        max_bytes=settings.lora_max_image_bytes, max_pixels=settings.lora_max_image_pixels,
        fetch_timeout=settings.lora_fetch_timeout,
        allowed_hosts=AllowedHosts.parse(settings.lora_fetch_allowed_hosts),
        max_side=settings.max_image_size,
    )
