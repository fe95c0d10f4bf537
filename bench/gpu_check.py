"""The engine's GPU speed and memory on the real FLUX.1-dev size, with no download.

Builds FLUX.1-dev's architecture with random bf16 weights directly on the GPU
(:mod:`core.image.random_flux`), then drives the engine's own GPU worker through it:

- milliseconds per attention call at FLUX's 1024² shape through every kernel diffusers can
  call here, and the one ATTENTION_BACKEND=auto picks;
- seconds per 1024² image at 28 steps with a rank-16 LoRA active, median of 3 after a
  warm-up (whose time includes the compilation), peak GPU memory, and the pixels' distance
  from bf16 eager on the same seeds and weights (PSNR, largest difference), for: bf16
  eager; the compiled fast path as ``serve`` runs it with COMPILE_TRANSFORMER=true (fused
  QKV, ATTENTION_BACKEND=auto, the LoRA hot-swapped at ``lora_scale`` 0.8) alone and with
  MagCache and TaylorSeer on its compiled blocks; the same with fp8 (when torchao is
  installed and the GPU has float8 tensor cores), and fp8 eager; each eager step cache at
  its default (first_block, taylorseer, mag); the compiled model unfused with native
  attention;
- LoRA switch seconds between two loaded LoRAs (eager: the LRU set) and between two LoRAs
  hot-swapped into a compiled transformer, with the number of recompilations it caused;
- one LoRA training step (rank 16) at 512² and 1024²: seconds and peak memory.

Prints one table and writes ``gpu-check.json``. Configurations run in order of interest
within ``--budget`` seconds; one that would not fit, or that fails, is reported as such and
the run goes on. ``--smoke`` runs the same code on the CPU with the development model's
sizes, a small image and 4 steps (the test suite runs it, so the script cannot rot).

Usage: python bench/gpu_check.py [--smoke] [--out gpu-check.json] [--budget 420]
(``make gpu-check`` on a CUDA machine.)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import logging
import math
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from prometheus_client import CollectorRegistry

from core.image.acceleration import Acceleration, hook_step_cache
from core.image.job import ImageJob
from core.image.loader import LoadedModel, prepare_model
from core.image.random_flux import (
    ModelSize,
    build_random_flux,
    build_random_transformer,
    write_random_lora,
)
from core.image.worker import GpuWorker
from core.lora.registry import LoraInfo, LoraRegistry
from core.metrics import EngineMetrics
from core.training.encode import encode_training_data
from core.training.trainer import ChunkPlan, run_chunk

_PROMPT = "sarah, a woman with red hair in a cafe, warm light, photograph"
_SCALE = 0.8  # the fast path's rows run their LoRA at a lora_scale other than 1
_COMPILE_ALLOWANCE = 90  # seconds a compiled configuration needs at least (build, compile)


@dataclass(frozen=True)
class Plan:
    size: ModelSize
    device: str
    dtype: torch.dtype
    image: int  # pixels per side
    steps: int
    warmup: int
    reps: int
    train_sizes: tuple[int, ...]
    switch_image: int
    budget: float


@dataclass
class Report:
    plan: Plan
    started: float = field(default_factory=time.perf_counter)
    environment: dict[str, Any] = field(default_factory=dict)
    images: list[dict[str, Any]] = field(default_factory=list)
    switches: list[dict[str, Any]] = field(default_factory=list)
    training: list[dict[str, Any]] = field(default_factory=list)
    # the first timed row's images, by seed: what every other row's pixels are compared to
    reference: list[np.ndarray] = field(default_factory=list)
    # the first row's model with its LoRA at another scale (the first seed only)
    scaled: dict[float, list[np.ndarray]] = field(default_factory=dict)
    attention: list[dict[str, Any]] = field(default_factory=list)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def fits(self, seconds: float) -> bool:
        return self.elapsed() + seconds <= self.plan.budget

    def as_json(self) -> dict[str, Any]:
        plan = self.plan
        return {
            "environment": self.environment,
            "plan": {"model": plan.size, "device": plan.device, "dtype": str(plan.dtype),
                     "image": plan.image, "steps": plan.steps, "warmup": plan.warmup,
                     "reps": plan.reps},
            "attention": self.attention, "images": self.images, "lora_switch": self.switches,
            "training": self.training,
            "total_seconds": round(self.elapsed(), 1),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, development model sizes, small image, 4 steps")
    parser.add_argument("--out", type=Path, default=Path("gpu-check.json"))
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole run (default 450; smoke 300)")
    parser.add_argument("--skip", default="",
                        help="comma-separated configurations to leave out, e.g. fp8,mag")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.smoke:
        plan = Plan("dev", "cpu", torch.float32, image=64, steps=4, warmup=1, reps=2,
                    train_sizes=(64, 128), switch_image=64, budget=args.budget or 300)
    else:
        if not torch.cuda.is_available():
            sys.exit("gpu_check: no CUDA device here (use --smoke for the CPU check)")
        plan = Plan("flux1-dev", "cuda", torch.bfloat16, image=1024, steps=28, warmup=1,
                    reps=3, train_sizes=(512, 1024), switch_image=1024,
                    budget=args.budget or 450)
    report = Report(plan)
    skip = {name.strip() for name in args.skip.split(",") if name.strip()}
    try:
        run(report, skip)
    finally:
        args.out.write_text(json.dumps(report.as_json(), indent=2) + "\n", encoding="utf-8")
        print_tables(report)
        print(f"\nwrote {args.out} ({report.elapsed():.0f} s)")


def run(report: Report, skip: set[str]) -> None:
    """The configurations, most wanted first (the budget may cut the last ones): bf16
    eager (the baseline), the compiled fast path with a LoRA at scale 0.8 and step caches
    on its compiled blocks, fp8 on that path, fp8 eager, the eager step caches, the plain
    compiled model, then training. A configuration that compiles or quantizes gets a fresh
    transformer with the same random weights, so every row's pixels compare with eager's."""
    plan = report.plan
    report.environment = environment(plan)
    print(f"gpu_check: {report.environment}", flush=True)
    started = time.perf_counter()
    pipeline = build_random_flux(plan.size, device=plan.device, dtype=plan.dtype)
    report.environment["build_seconds"] = round(time.perf_counter() - started, 1)
    print(f"built random {plan.size} in {report.environment['build_seconds']} s", flush=True)
    if "attention" not in skip:
        measure_attention(report)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        loras = make_loras(pipeline.transformer, Path(tmp))
        eager = model_of(pipeline, plan, Acceleration(), compiled=False)
        measure_images(report, "bf16 eager" if plan.dtype == torch.bfloat16 else "eager",
                       eager, loras[0])
        reference_at(report, eager, loras[0], _SCALE)
        if "switch" not in skip:
            measure_switches(report, "eager (LRU set)", eager, loras)
        _unload_loras(pipeline)  # the hotswap slot is prepared on a bare transformer
        if "fast" not in skip:
            measure_fast_path(report, pipeline, loras, Acceleration(), skip)
        if "fp8" not in skip:
            measure_fp8(report, pipeline, loras, skip)
        if report.fits(60):
            fresh_transformer(pipeline, plan)
        for cache in ("taylorseer", "first_block", "mag"):
            if cache in skip or not report.fits(30):
                continue
            model = model_of(pipeline, plan, Acceleration(step_cache=cache), compiled=False)
            measure_images(report, f"step cache {cache}", model, loras[0])
            pipeline.transformer.disable_cache()
        if "compiled" not in skip and report.fits(_COMPILE_ALLOWANCE):
            fresh_transformer(pipeline, plan)
            label = "compiled (hotswap slot), unfused, native attention"
            compiled = guarded(report, label, lambda: model_of(
                pipeline, plan, Acceleration(), compiled=True, fuse_qkv=False))
            if compiled is not None:
                measure_images(report, label, compiled, loras[0])
        if "training" not in skip and report.fits(60):  # last: a CUDA fault here leaves
            fresh_transformer(pipeline, plan)  # the figures above; bf16, eager
            trainable = model_of(pipeline, plan, Acceleration(), compiled=False)
            for size in plan.train_sizes:
                measure_training(report, trainable, size)


def fresh_transformer(pipeline: Any, plan: Plan) -> None:
    """Give ``pipeline`` a new transformer with the first one's weights (no adapters, not
    compiled, not quantized), the old one and torch's compiled graphs dropped first: each
    compiled configuration compiles from scratch, as ``serve`` does at start-up (and the
    graphs of the blocks' shared code never reach torch's recompilation limit)."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    pipeline.register_modules(transformer=None)
    # diffusers' set_attention_backend also sets the process-wide default, which a fresh
    # transformer's attentions would follow: back to torch's SDPA
    _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)
    torch._dynamo.reset()
    gc.collect()
    if plan.device == "cuda":
        torch.cuda.empty_cache()
    pipeline.register_modules(transformer=build_random_transformer(
        plan.size, device=plan.device, dtype=plan.dtype))


def measure_fast_path(report: Report, pipeline: Any, loras: list[LoraInfo],
                      acceleration: Acceleration, skip: set[str]) -> None:
    """The compiled fast path as ``serve`` runs it with COMPILE_TRANSFORMER=true (fused
    QKV, ATTENTION_BACKEND=auto, ``acceleration``'s quantization) on a fresh transformer,
    a LoRA hot-swapped at ``lora_scale`` 0.8; then MagCache and TaylorSeer on its compiled
    blocks, and LoRA switches by hotswap."""
    plan = report.plan
    name = "fp8 " if acceleration.quantization == "fp8" else ""
    label = f"{name}compiled fast path, LoRA at 0.8"
    if not report.fits(_COMPILE_ALLOWANCE):
        report.images.append({"config": label, "skipped": "over the time budget"})
        return
    fresh_transformer(pipeline, plan)
    compiled = guarded(report, label, lambda: model_of(
        pipeline, plan, acceleration, compiled=True, attention_backend="auto"))
    if compiled is None:
        return
    report.environment.setdefault("attention_backend_auto", compiled.attention_backend)
    measure_images(report, label, compiled, loras[0], scale=_SCALE)
    if "switch" not in skip and not name:
        measure_switches(report, "compiled hotswap", compiled, loras)
    for cache in ("mag", "taylorseer"):
        if f"compiled+{cache}" in skip:
            continue
        cached_label = f"{name}compiled fast path + step cache {cache}, LoRA at 0.8"
        cached = guarded(report, cached_label, lambda cache=cache: with_step_cache(
            compiled, dataclasses.replace(acceleration, step_cache=cache)))
        if cached is not None:
            measure_images(report, cached_label, cached, loras[0], scale=_SCALE)
            pipeline.transformer.disable_cache()
    if "training" not in skip and not name:  # a LoRA trains on the model serve runs
        measure_training(report, compiled, plan.train_sizes[0], config="compiled fast path")


def environment(plan: Plan) -> dict[str, Any]:
    import diffusers

    found: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__,
        "diffusers": diffusers.__version__, "device": plan.device,
    }
    try:
        import torchao  # type: ignore[import-not-found,unused-ignore]

        found["torchao"] = torchao.__version__
    except ImportError:
        found["torchao"] = None
    if plan.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        found.update(gpu=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                     capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
    return found


def make_loras(transformer: Any, directory: Path) -> list[LoraInfo]:
    registry = LoraRegistry(directory / "registry")
    infos = []
    for index, name in enumerate(("character", "outfit")):
        weights = write_random_lora(transformer, directory / f"{name}.safetensors", rank=16,
                                    seed=index)
        infos.append(registry.register(name, weights, trigger_word=None, base_model=None))
    return infos


def model_of(pipeline: Any, plan: Plan, acceleration: Acceleration, *, compiled: bool,
             fuse_qkv: bool = True, attention_backend: str = "native") -> LoadedModel:
    """The loader's preparation (memory mode, attention backend, fused QKV, fp8, step
    cache, compilation with the hotswap slot) on the pipeline built in memory."""
    return prepare_model(pipeline, name=f"random {plan.size}", path=Path(plan.size),
                         development_model=plan.size == "dev", device=plan.device,
                         compile_transformer=compiled, acceleration=acceleration,
                         fuse_qkv=fuse_qkv, attention_backend=attention_backend)


def with_step_cache(compiled: LoadedModel, acceleration: Acceleration) -> LoadedModel:
    """``compiled`` with a step cache hooked around its compiled blocks, as the loader
    does for COMPILE_TRANSFORMER=true with STEP_CACHE (the blocks' graphs are kept)."""
    step_cache = hook_step_cache(compiled.pipeline, acceleration, compiled=True)
    return dataclasses.replace(compiled, acceleration=acceleration, step_cache=step_cache)


def _unload_loras(pipeline: Any) -> None:
    try:
        if pipeline.get_list_adapters().get("transformer"):
            pipeline.unload_lora_weights()
    except ValueError:  # no adapters at all
        pass


@contextlib.contextmanager
def running(model: LoadedModel) -> Iterator[tuple[GpuWorker, EngineMetrics]]:
    """A GPU worker on ``model``; stopped after, with its LoRAs unloaded (the next
    worker's adapter set starts empty), except a compiled model's hotswap slot."""
    metrics = EngineMetrics(CollectorRegistry())
    worker = GpuWorker(model, max_batch_size=1, batch_window_ms=0, lora_cache_size=4,
                       vae_tiling_threshold=4096, max_sequence_length=512, metrics=metrics)
    worker.start()
    try:
        yield worker, metrics
    finally:
        worker.stop()
        if model.hotswap_slot is None:
            _unload_loras(model.pipeline)


def job(plan: Plan, lora: LoraInfo | None, *, seed: int, size: int | None = None,
        steps: int | None = None, scale: float = 1.0) -> ImageJob:
    side = size or plan.image
    return ImageJob(prompt=_PROMPT, negative_prompt=None, width=side, height=side,
                    steps=steps or plan.steps, guidance=3.5, true_cfg_scale=1.0, seed=seed,
                    lora=lora, lora_scale=scale)


def guarded(report: Report, label: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - one configuration's failure is its result
        print(f"{label}: FAILED: {exc}", flush=True)
        traceback.print_exc()
        report.images.append({"config": label, "error": f"{type(exc).__name__}: {exc}"})
        return None


def _reset_peak(plan: Plan) -> None:
    gc.collect()
    if plan.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(plan: Plan) -> float | None:
    if plan.device != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


def measure_images(report: Report, label: str, model: LoadedModel, lora: LoraInfo, *,
                   scale: float = 1.0) -> None:
    """Times ``model``'s images with ``lora`` at ``scale``; their pixels are compared with
    the first row's (the baseline's at scale 1 when this is the baseline; with another
    scale, with the baseline's at that scale, made once on the eager model)."""
    plan = report.plan
    baseline = next((row["median_s"] for row in report.images if "median_s" in row), None)
    estimate = (baseline or 0) * (plan.warmup + plan.reps)
    if not report.fits(estimate):
        report.images.append({"config": label, "skipped": "over the time budget"})
        print(f"{label}: skipped (budget)", flush=True)
        return
    try:
        _reset_peak(plan)
        with running(model) as (worker, _):
            row, pixels = _time_images(plan, label, worker, lora, scale)
        if not report.reference:
            report.reference = pixels
        reference = report.reference if scale == 1.0 else report.scaled.get(scale)
        row.update(deviation(reference, pixels) if reference else {"psnr_db": None,
                                                                  "max_abs_diff": None})
        row["lora_scale"] = scale
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        row = {"config": label, "error": f"{type(exc).__name__}: {exc}"}
    report.images.append(row)
    print(f"{label}: {row}", flush=True)


def deviation(reference: list[np.ndarray], pixels: list[np.ndarray]) -> dict[str, Any]:
    """How far ``pixels`` are from ``reference`` (the same seeds through the first row; the
    first ``len(reference)`` of them): ``psnr_db`` over every channel of every image
    (``None`` when identical) and ``max_abs_diff``, the largest difference of one channel
    in 0-255."""
    ours = np.stack(pixels[:len(reference)]).astype(np.float64)
    theirs = np.stack(reference).astype(np.float64)
    mse = float(np.mean((ours - theirs) ** 2))
    return {"psnr_db": round(10 * math.log10(255.0**2 / mse), 2) if mse > 0 else None,
            "max_abs_diff": int(np.max(np.abs(ours - theirs)))}


def reference_at(report: Report, model: LoadedModel, lora: LoraInfo, scale: float) -> None:
    """The first seed's image from ``model`` (the baseline) with ``lora`` at ``scale``:
    what the rows at that scale are compared to."""
    try:
        with running(model) as (worker, _):
            done = worker.submit(job(report.plan, lora, seed=0, scale=scale)).result()
        image = done[0] if isinstance(done, list) else done
        report.scaled[scale] = [np.asarray(image.convert("RGB"))]
    except Exception:  # noqa: BLE001 - the rows at this scale then show no deviation
        traceback.print_exc()


def measure_attention(report: Report) -> None:
    """Milliseconds per attention call at FLUX's shape for the plan's image (4096 image
    tokens and 512 text tokens at 1024², 24 heads of 128) through each kernel diffusers
    can call here, and which one ATTENTION_BACKEND=auto picks: whether its order holds on
    this card."""
    from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn

    from core.image.attention import resolve_attention_backend

    plan = report.plan
    tokens = (plan.image // 16) ** 2 + 512
    heads = 24 if plan.size == "flux1-dev" else 2
    head_dim = 128 if plan.size == "flux1-dev" else 16
    query = torch.randn(1, tokens, heads, head_dim, device=plan.device, dtype=plan.dtype)
    chosen = resolve_attention_backend("auto", device=plan.device, dtype=plan.dtype)
    for name in ("native", "_native_cudnn", "_native_flash", "_native_efficient",
                 "_native_math", "_flash_3", "flash", "sage"):
        backend = AttentionBackendName(name)
        try:
            with torch.no_grad():
                for _ in range(3):  # warm-up
                    dispatch_attention_fn(query, query, query, backend=backend)
                _synchronize(plan)
                started = time.perf_counter()
                for _ in range(10):
                    dispatch_attention_fn(query, query, query, backend=backend)
                _synchronize(plan)
            row: dict[str, Any] = {"backend": name,
                                   "ms": round(100 * (time.perf_counter() - started), 3)}
        except Exception as exc:  # noqa: BLE001 - not available here: said, not hidden
            row = {"backend": name, "unavailable": f"{type(exc).__name__}: "
                                                   f"{str(exc).splitlines()[0][:120]}"}
        row["auto"] = name == chosen
        report.attention.append(row)
    print(f"attention: {report.attention}", flush=True)


def _synchronize(plan: Plan) -> None:
    if plan.device == "cuda":
        torch.cuda.synchronize()


def _time_images(plan: Plan, label: str, worker: GpuWorker, lora: LoraInfo, scale: float
                 ) -> tuple[dict[str, Any], list[np.ndarray]]:
    times: list[float] = []
    pixels: list[np.ndarray] = []
    first = None
    for index in range(plan.warmup + plan.reps):
        started = time.perf_counter()
        done = worker.submit(job(plan, lora, seed=index, scale=scale)).result()
        image = done[0] if isinstance(done, list) else done
        if plan.device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        if index < plan.warmup:
            first = seconds
        else:
            times.append(seconds)
        if image.size != (plan.image, plan.image):
            raise RuntimeError(f"image of {image.size}, asked {plan.image}²")
        pixels.append(np.asarray(image.convert("RGB")))
    return {"config": label, "median_s": round(statistics.median(times), 3),
            "times_s": [round(t, 3) for t in times], "warmup_s": round(first or 0, 1),
            "peak_gib": _peak_gib(plan)}, pixels


def measure_switches(report: Report, label: str, model: LoadedModel,
                     loras: list[LoraInfo]) -> None:
    """Small images alternating two LoRAs; the worker's own switch histogram."""
    plan = report.plan
    if not report.fits(30):
        report.switches.append({"mode": label, "skipped": "over the time budget"})
        return
    try:
        with running(model) as (worker, metrics):
            for index, lora in enumerate(loras):  # load both (and compile this shape)
                worker.submit(job(plan, lora, seed=index, size=plan.switch_image,
                                  steps=2)).result()
            before_sum, before_count = _histogram(metrics, "engine_lora_switch_seconds")
            graphs_before = _compiled_graphs()
            for index in range(6):
                worker.submit(job(plan, loras[index % 2], seed=index, size=plan.switch_image,
                                  steps=2)).result()
            after_sum, after_count = _histogram(metrics, "engine_lora_switch_seconds")
        count = after_count - before_count
        row = {"mode": label, "switches": int(count),
               "mean_ms": round(1000 * (after_sum - before_sum) / count, 2) if count else None,
               "recompilations": _compiled_graphs() - graphs_before if model.compiled else None}
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        row = {"mode": label, "error": f"{type(exc).__name__}: {exc}"}
    report.switches.append(row)
    print(f"LoRA switch {label}: {row}", flush=True)


def _histogram(metrics: EngineMetrics, name: str) -> tuple[float, float]:
    total = count = 0.0
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == f"{name}_sum":
                total += sample.value
            elif sample.name == f"{name}_count":
                count += sample.value
    return total, count


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def measure_training(report: Report, model: LoadedModel, size: int, *,
                     config: str = "eager") -> None:
    """One rank-16 training step at ``size``² through the worker's exclusive slot (as
    trainings run), after one warm-up step, on ``model`` (``config`` names it)."""
    plan = report.plan
    if not report.fits(45):
        report.training.append({"config": config, "size": size,
                                "skipped": "over the time budget"})
        return
    generator = torch.Generator().manual_seed(size)
    pixels = torch.rand((2, 3, size, size), generator=generator) * 2 - 1
    try:
        with running(model) as (worker, _):
            cache = worker.submit_exclusive(lambda pipe: encode_training_data(
                pipe, pixels, "a photo of sarah", max_sequence_length=512)).result()
            warm = worker.submit_exclusive(lambda pipe: run_chunk(pipe, cache, ChunkPlan(
                "gpu_check", seed=1, end_step=1, learning_rate=1e-4, batch_size=1))).result()
            _reset_peak(plan)
            result = worker.submit_exclusive(lambda pipe: run_chunk(pipe, cache, ChunkPlan(
                "gpu_check", seed=1, end_step=3, learning_rate=1e-4, batch_size=1,
                state=warm.state))).result()
        loss = result.state.loss
        row = {"config": config, "size": size,
               "seconds_per_step": round(result.seconds_per_step or 0, 3),
               "peak_gib": _peak_gib(plan),
               "finite_loss": loss is not None and math.isfinite(loss)}
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        row = {"config": config, "size": size, "error": f"{type(exc).__name__}: {exc}"}
    report.training.append(row)
    print(f"training {config} {size}²: {row}", flush=True)


def measure_fp8(report: Report, pipeline: Any, loras: list[LoraInfo], skip: set[str]) -> None:
    """fp8 (QUANTIZATION=fp8) on the compiled fast path, then without compilation (which
    ``serve`` warns about: torchao's dynamic fp8 is published as slower than bf16 eager)."""
    plan = report.plan
    if report.environment.get("torchao") is None or plan.device != "cuda" \
            or torch.cuda.get_device_capability() < (8, 9):
        report.images.append({"config": "fp8",
                              "skipped": "needs CUDA compute capability 8.9+ and torchao"})
        return
    fp8 = Acceleration(quantization="fp8")
    measure_fast_path(report, pipeline, loras, fp8, skip | {"compiled+taylorseer"})
    label = "fp8 eager, LoRA at 0.8"
    if not report.fits(60):
        report.images.append({"config": label, "skipped": "over the time budget"})
        return
    fresh_transformer(pipeline, plan)
    model = guarded(report, label, lambda: model_of(pipeline, plan, fp8, compiled=False))
    if model is not None:
        measure_images(report, label, model, loras[0], scale=_SCALE)
        _unload_loras(pipeline)


def print_tables(report: Report) -> None:
    plan = report.plan
    env = report.environment
    print(f"\n{env.get('gpu', plan.device)} · {plan.size} · {plan.image}² · {plan.steps} "
          f"steps · median of {plan.reps} after {plan.warmup} warm-up")
    baseline = next((row.get("median_s") for row in report.images if "median_s" in row), None)
    print("\n| configuration | s/image | × vs first | warm-up s | peak GiB "
          "| PSNR dB vs eager | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for row in report.images:
        if "median_s" in row:
            ratio = f"{baseline / row['median_s']:.2f}" if baseline else "-"
            psnr = ("-" if row["max_abs_diff"] is None else "identical"
                    if row["psnr_db"] is None else f"{row['psnr_db']:.2f}")
            print(f"| {row['config']} | {row['median_s']:.3f} | {ratio} | {row['warmup_s']} "
                  f"| {row['peak_gib'] if row['peak_gib'] is not None else '-'} "
                  f"| {psnr} | {row['max_abs_diff']} |")
        else:
            print(f"| {row['config']} | {row.get('skipped') or row.get('error')} | | | | | |")
    print(f"\n| attention kernel at {plan.image}² | ms per call | chosen by auto |")
    print("|---|---|---|")
    for row in report.attention:
        print(f"| {row['backend']} | {row.get('ms', row.get('unavailable'))} | "
              f"{'yes' if row['auto'] else ''} |")
    print("\n| LoRA switch | switches | mean ms | recompilations |")
    print("|---|---|---|---|")
    for row in report.switches:
        if "mean_ms" in row:
            print(f"| {row['mode']} | {row['switches']} | {row['mean_ms']} | "
                  f"{row['recompilations'] if row['recompilations'] is not None else '-'} |")
        else:
            print(f"| {row['mode']} | {row.get('skipped') or row.get('error')} | | |")
    print("\n| training step | s/step | peak GiB |")
    print("|---|---|---|")
    for row in report.training:
        if "seconds_per_step" in row:
            print(f"| {row['config']}, {row['size']}² rank 16 | {row['seconds_per_step']} | "
                  f"{row['peak_gib'] if row['peak_gib'] is not None else '-'} |")
        else:
            print(f"| {row['config']}, {row['size']}² | "
                  f"{row.get('skipped') or row.get('error')} | |")


if __name__ == "__main__":
    main()
