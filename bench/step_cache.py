"""STEP_CACHE on the development model: seconds per image against no cache, same run.

Each configuration (none, taylorseer, first_block, mag) loads the development model the
way ``dev`` does (``load_pipeline`` with the setting), starts the engine's GPU worker and
times images of ``--size``² at ``--steps`` steps after one warm-up; the whole sequence runs
``--rounds`` times and each configuration reports its median, as a ratio to ``none``
measured in the same run. Workers run one after another (one torch thread at a time: two
long-lived threads running CPU ops slow each other down, see docs/image.md).

TaylorSeer's schedule is fixed (one full step in ``STEP_CACHE_INTERVAL``), so its speed-up
does not depend on the random weights; first_block and mag decide from the content, and on
random weights their figures say little about the real model's.

Usage: .venv/bin/python bench/step_cache.py [--size 512] [--steps 28] [--images 3]
       [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from core.image import GpuWorker, ImageJob, build_dev_model, load_pipeline
from core.image.acceleration import Acceleration

CACHES = ("none", "taylorseer", "first_block", "mag")


def seconds_per_image(model_dir: Path, cache: str, size: int, steps: int,
                      images: int) -> tuple[list[float], np.ndarray]:
    model = load_pipeline(model_dir, device="cpu", use_fp16=False, memory_mode="none",
                          attention_backend="native", compile_transformer=False,
                          acceleration=Acceleration(step_cache=cache))
    worker = GpuWorker(model, max_batch_size=1, batch_window_ms=0, lora_cache_size=1,
                       vae_tiling_threshold=4096, max_sequence_length=512)
    worker.start()
    try:
        def one(seed: int) -> tuple[float, np.ndarray]:
            job = ImageJob(prompt="sarah in a cafe, warm light", negative_prompt=None,
                           width=size, height=size, steps=steps, guidance=3.5,
                           true_cfg_scale=1.0, seed=seed, lora=None)
            started = time.perf_counter()
            image = worker.submit(job).result()
            return time.perf_counter() - started, np.asarray(image)

        one(0)  # warm-up
        timed = [one(seed) for seed in range(1, images + 1)]
        again = one(1)[1]
        if not np.array_equal(again, timed[0][1]):
            raise AssertionError(f"{cache}: the same request gave other pixels")
        return [seconds for seconds, _ in timed], timed[0][1]
    finally:
        worker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    times: dict[str, list[float]] = {cache: [] for cache in CACHES}
    reference: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_dev_model(Path(tmp) / "flux-dev")
        for _ in range(args.rounds):
            for cache in CACHES:
                seconds, first = seconds_per_image(model_dir, cache, args.size, args.steps,
                                                   args.images)
                times[cache].extend(seconds)
                reference[cache] = first
    base = statistics.median(times["none"])
    print(f"\ndevelopment model, {args.size}² × {args.steps} steps, {args.images} images × "
          f"{args.rounds} rounds per configuration (median), CPU\n")
    print("| STEP_CACHE | s/image | speed-up vs none | mean pixel difference vs none |")
    print("|---|---|---|---|")
    for cache in CACHES:
        median = statistics.median(times[cache])
        difference = np.abs(reference[cache].astype(np.int16)
                            - reference["none"].astype(np.int16)).mean()
        print(f"| {cache} | {median:.3f} | {base / median:.2f}× | {difference:.1f} / 255 |")
    print("\nSame request twice gave the same pixels in every configuration.")


if __name__ == "__main__":
    main()
