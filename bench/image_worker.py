"""Images through the GPU worker versus a plain diffusers loop, same model, same run.

On the tiny development model (or --model DIR) measures:
- build and load times of the development model;
- images/s of a plain ``FluxPipeline`` loop (one image per call, and four per call) and
  of :class:`GpuWorker` (max batch 1, jobs one at a time; max batch 4, jobs all queued);
- LoRA switch times through the worker's adapter set: between cached adapters, back to
  the base model, and a cold load (cache of one, so every switch evicts and loads).

Usage: .venv/bin/python bench/image_worker.py [--images 48] [--size 64] [--steps 4]
Prints a Markdown table; figures are recorded in docs/image.md.

The plain loop runs in a fresh thread of its own, as the worker does: torch's OpenMP pool
is per calling thread, and once two long-lived threads have run parallel CPU ops, both
run small ops several times slower (see docs/image.md), which would skew the comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import diffusers
import torch

from core.image import GpuWorker, ImageJob, LoadedModel, build_dev_model, load_pipeline
from core.image.devmodel import make_dev_lora
from core.lora import AdapterSet, LoraInfo, LoraRegistry

T = TypeVar("T")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def in_fresh_thread(fn: Callable[[], T]) -> T:
    """Run ``fn`` in a new thread (which ends with it), keeping torch work off main."""
    result: list[T] = []
    thread = threading.Thread(target=lambda: result.append(fn()))
    thread.start()
    thread.join()
    return result[0]


def timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def plain_loop(model: LoadedModel, args: argparse.Namespace, per_call: int) -> float:
    pipe = model.pipeline

    def run() -> None:
        for start in range(0, args.images, per_call):
            seeds = range(start, min(start + per_call, args.images))
            pipe([f"portrait {seed}" for seed in seeds], width=args.size, height=args.size,
                 num_inference_steps=args.steps, guidance_scale=3.5,
                 generator=[torch.Generator().manual_seed(seed) for seed in seeds],
                 max_sequence_length=args.seq)

    def measure() -> float:
        run()  # warm-up
        return float(args.images / timed(run))

    return in_fresh_thread(measure)


def job(seed: int, args: argparse.Namespace, lora: LoraInfo | None = None) -> ImageJob:
    return ImageJob(prompt=f"portrait {seed}", negative_prompt=None, width=args.size,
                    height=args.size, steps=args.steps, guidance=3.5, true_cfg_scale=1.0,
                    seed=seed, lora=lora)


async def through_worker(model: LoadedModel, args: argparse.Namespace, batch: int) -> float:
    worker = GpuWorker(model, max_batch_size=batch, batch_window_ms=20, lora_cache_size=4,
                       vae_tiling_threshold=1536, max_sequence_length=args.seq)
    worker.start()
    try:
        async def run() -> None:
            if batch == 1:
                for seed in range(args.images):
                    await worker.generate(job(seed, args))
            else:
                await asyncio.gather(*(worker.generate(job(s, args)) for s in range(args.images)))

        await run()  # warm-up
        started = time.perf_counter()
        await run()
        return float(args.images / (time.perf_counter() - started))
    finally:
        worker.stop()


def lora_switches(model: LoadedModel, loras: list[LoraInfo], rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"cached": [], "to base": [], "cold load": []}
    record: list[float] = []
    warm = AdapterSet(model.pipeline, capacity=len(loras), on_switch=record.append)
    for lora in loras:
        warm.activate(lora)
    for index in range(rounds):
        record.clear()
        warm.activate(loras[index % len(loras)])
        times["cached"].extend(record)
        record.clear()
        warm.activate(None)
        times["to base"].extend(record)
    warm.reset()
    cold = AdapterSet(model.pipeline, capacity=1, on_switch=record.append)
    for index in range(rounds):
        record.clear()
        cold.activate(loras[index % len(loras)])
        times["cold load"].extend(record)
    cold.reset()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64, help="T5 max_sequence_length")
    parser.add_argument("--rounds", type=int, default=200, help="LoRA switches measured")
    parser.add_argument("--repeats", type=int, default=5, help="measurements per path")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    diffusers.utils.logging.set_verbosity_error()  # one warning per LoRA load otherwise
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        build_dev_model(workdir / "warm-up", seed=0)  # imports and first-use costs
        build_s = timed(lambda: build_dev_model(workdir / "model", seed=0))
        started = time.perf_counter()
        model = load_pipeline(workdir / "model", device="auto", use_fp16=False,
                              memory_mode="none", attention_backend="native",
                              compile_transformer=False)
        load_s = time.perf_counter() - started
        one_s = in_fresh_thread(lambda: timed(lambda: model.pipeline(
            "portrait", width=args.size, height=args.size, num_inference_steps=args.steps,
            generator=torch.Generator().manual_seed(0), max_sequence_length=args.seq)))
        registry = LoraRegistry(workdir / "loras")
        loras = [registry.register(f"c{i}", make_dev_lora(model.pipeline, workdir / f"{i}.st",
                                                          seed=i), trigger_word=f"t{i}",
                                   base_model=model.name) for i in range(3)]
        paths: list[tuple[str, Callable[[], float]]] = [
            ("plain diffusers, 1 image per call", lambda: plain_loop(model, args, 1)),
            ("GpuWorker, max batch 1, one job at a time",
             lambda: asyncio.run(through_worker(model, args, 1))),
            ("plain diffusers, 4 images per call", lambda: plain_loop(model, args, 4)),
            ("GpuWorker, max batch 4, all jobs queued",
             lambda: asyncio.run(through_worker(model, args, 4))),
        ]
        rates: dict[str, list[float]] = {name: [] for name, _ in paths}
        for _ in range(args.repeats):  # interleaved, so that machine noise hits all paths
            for name, measure in paths:
                rates[name].append(measure())
        switches = in_fresh_thread(lambda: lora_switches(model, loras, args.rounds))
    print(f"model {model.name} on {model.device} ({model.dtype}), torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.size}x{args.size}, {args.steps} steps, T5 length {args.seq}\n")
    print(f"build {build_s * 1000:.0f} ms, load {load_s * 1000:.0f} ms, "
          f"first image {one_s * 1000:.0f} ms\n")
    print(f"| path | images/s, median of {args.repeats} | min | max |\n|---|---|---|---|")
    for name, values in rates.items():
        print(f"| {name} | {statistics.median(values):.1f} | {min(values):.1f} | "
              f"{max(values):.1f} |")
    print("\n| LoRA switch | p50 ms | p99 ms | n |\n|---|---|---|---|")
    for name, values in switches.items():
        print(f"| {name} | {statistics.median(values) * 1000:.2f} | "
              f"{pct(values, 0.99) * 1000:.2f} | {len(values)} |")


if __name__ == "__main__":
    main()
