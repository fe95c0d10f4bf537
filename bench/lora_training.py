"""LoRA training speed on the tiny development model (or --model DIR), on this machine.

Measures, in the GPU worker as the engine runs it:
- training steps/s of one long chunk, at batch size 1 and 2 (the flow-matching step:
  forward, backward, AdamW) and the probe loss before and after;
- steps/s of the engine's chunked path (TrainingRunner: attach/detach of the adapter per
  chunk, a checkpoint written every --every steps), i.e. what a training really gets;
- how long an image request waits while a training runs, against an idle worker.

Usage: .venv/bin/python bench/lora_training.py [--steps 200] [--size 64] [--seq 512]
       [--every 50]
Prints a Markdown table; figures are recorded in docs/training.md.
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
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from core.image import GpuWorker, ImageJob, build_dev_model, load_pipeline
from core.training.checkpoint import TrainingFolder
from core.training.encode import TrainingCache, encode_training_data
from core.training.estimate import StepTimes
from core.training.images import check_image
from core.training.pixels import to_pixels
from core.training.progress import ProgressFanout
from core.training.runner import TrainingRunner
from core.training.spec import TrainingLimits, TrainingSpec
from core.training.trainer import ChunkPlan, run_chunk


def photos(count: int) -> list[bytes]:
    import io

    from PIL import Image, ImageDraw

    made = []
    for index in range(count):
        image = Image.new("RGB", (128, 128), (40 + 30 * index, 90, 160))
        ImageDraw.Draw(image).ellipse([20 + 9 * index, 24, 84, 100], fill=(230, 190, 160))
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        made.append(buffer.getvalue())
    return made


def job(seed: int, size: int) -> ImageJob:
    return ImageJob(prompt="a portrait", negative_prompt=None, width=size, height=size,
                    steps=4, guidance=3.5, true_cfg_scale=1.0, seed=seed, lora=None)


async def chunk_rate(worker: GpuWorker, cache: TrainingCache, steps: int, batch: int
                     ) -> tuple[float, float, float]:
    """steps/s of one chunk of ``steps`` (after a warm-up), probe before and after."""
    warm = ChunkPlan("bench_warm", seed=1, end_step=5, learning_rate=1e-3, batch_size=batch)
    await worker.run_exclusive(lambda p: run_chunk(p, cache, warm))
    plan = ChunkPlan("bench", seed=1, end_step=steps, learning_rate=1e-3, batch_size=batch,
                     probe_before=True, probe_after=True)
    result = await worker.run_exclusive(lambda p: run_chunk(p, cache, plan))
    assert result.seconds_per_step is not None
    assert result.probe_before is not None and result.probe_after is not None
    return 1 / result.seconds_per_step, result.probe_before, result.probe_after


async def runner_rate(worker: GpuWorker, root: Path, images: list[bytes], args: Any,
                      *, with_images: bool) -> tuple[float, list[float]]:
    """steps/s of the chunked path with checkpoints (encoding included); with
    ``with_images`` an image request is kept queued all along and its waits returned."""
    limits = TrainingLimits()
    checked = [check_image(data, f"images.{i}", limits) for i, data in enumerate(images)]
    spec = TrainingSpec(f"bench_{int(with_images):08d}", "bench", None, "bench", "zqx",
                        "a photo of zqx", args.steps, 1e-3, args.size, 1, "http",
                        tuple(c.sha256 for c in checked))
    folder = TrainingFolder(root / spec.training_id)
    folder.write_inputs(spec, checked)
    runner = TrainingRunner(worker, StepTimes(root / "times.json", development_model=True),
                            checkpoint_every=args.every, max_sequence_length=args.seq)
    progress = ProgressFanout(spec.steps, 1.0, lambda step, loss: None)
    started = time.perf_counter()
    training = asyncio.create_task(runner.run(spec, folder, progress, threading.Event()))
    waits: list[float] = []
    while with_images and not training.done():
        begun = time.perf_counter()
        await worker.generate(job(len(waits), args.size))
        waits.append(time.perf_counter() - begun)
    await training
    elapsed = time.perf_counter() - started
    await progress.aclose()
    return args.steps / elapsed, waits


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = args.model or build_dev_model(root / "model")
        model = load_pipeline(model_dir, device=args.device, use_fp16=False,
                              memory_mode="none", attention_backend="native",
                              compile_transformer=False)
        worker = GpuWorker(model, max_batch_size=1, batch_window_ms=0, lora_cache_size=2,
                           vae_tiling_threshold=4096, max_sequence_length=args.seq)
        worker.start()
        try:
            images = photos(5)
            pixels = to_pixels(images, args.size)
            cache = await worker.run_exclusive(lambda p: encode_training_data(
                p, pixels, "a photo of zqx", max_sequence_length=args.seq))
            rows = []
            for batch in (1, 2):
                rate, before, after = await chunk_rate(worker, cache, args.steps, batch)
                rows.append((f"one chunk, batch {batch}", rate, f"{before:.3f} → {after:.3f}"))
            rate, _ = await runner_rate(worker, root / "training", images, args,
                                        with_images=False)
            rows.append((f"engine path, checkpoint every {args.every}, batch 1", rate, ""))
            idle = []
            for seed in range(8):
                started = time.perf_counter()
                await worker.generate(job(seed, args.size))
                idle.append(time.perf_counter() - started)
            _, during = await runner_rate(worker, root / "training", images, args,
                                          with_images=True)
        finally:
            worker.stop()
    device = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    print(f"\n{model.name} on {device} ({torch.get_num_threads()} threads), {args.size}px, "
          f"T5 length {args.seq}, {args.steps} steps, lr 1e-3\n")
    print("| run | steps/s | ms/step | probe loss before → after |")
    print("|---|---|---|---|")
    for name, rate, probe in rows:
        print(f"| {name} | {rate:.1f} | {1000 / rate:.1f} | {probe} |")
    print(f"\nimage request ({args.size}px, 4 steps) while training: p50 "
          f"{1000 * statistics.median(during):.0f} ms, max {1000 * max(during):.0f} ms "
          f"({len(during)} images); idle worker: p50 {1000 * statistics.median(idle):.0f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--every", type=int, default=50)
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main(parser.parse_args()))
