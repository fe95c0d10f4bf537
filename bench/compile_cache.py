"""A compiled model's start-up with and without the compile cache (COMPILE_CACHE).

Each sample is one instance in a process of its own with an empty torch compile cache
(``TORCHINDUCTOR_CACHE_DIR``), as a new pod: ``build_image_service`` with
COMPILE_TRANSFORMER=true (load, fuse, compile in the warm-up), timed. Cold: an output
folder with no blob. Warm: an output folder holding the blob a first instance left (what
a new pod finds in the shared store, copied into its folder). Alternated, ``--rounds``
each, on the development model (CPU) or ``--model`` (a FLUX folder, on a GPU).

Usage: python bench/compile_cache.py [--rounds 3] [--model PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


async def child(model: Path, output_dir: Path) -> None:
    import httpx
    from prometheus_client import CollectorRegistry

    from core.image.compile_cache import kernel_cache_counts
    from core.image.factory import build_image_service
    from core.metrics import EngineMetrics
    from core.outputs import OutputStore
    from core.settings import load_settings

    settings = load_settings(output_dir=output_dir, compile_transformer=True, _env_file=None)
    started = time.perf_counter()
    async with httpx.AsyncClient() as http:
        _, worker = await build_image_service(
            settings, model, OutputStore(output_dir), http, EngineMetrics(CollectorRegistry()))
    seconds = time.perf_counter() - started
    hits, misses = kernel_cache_counts()
    await asyncio.to_thread(worker.stop)
    print(json.dumps({"seconds": seconds, "hits": hits, "misses": misses}))


def sample(model: Path, output_dir: Path, scratch: Path) -> dict[str, float]:
    inductor = Path(tempfile.mkdtemp(dir=scratch, prefix="inductor-"))
    done = subprocess.run(
        [sys.executable, __file__, "--child", str(model), str(output_dir)],
        env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor)},
        capture_output=True, text=True, check=False)
    shutil.rmtree(inductor, ignore_errors=True)
    if done.returncode != 0:
        sys.exit(done.stderr[-3000:])
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        asyncio.run(child(*args.child))
        return
    with tempfile.TemporaryDirectory(prefix="compile-cache-bench-") as tmp:
        scratch = Path(tmp)
        model = args.model
        if model is None:
            from core.image.devmodel import build_dev_model

            model = build_dev_model(scratch / "model")
        warm_outputs = scratch / "warm"
        first = sample(model, warm_outputs, scratch)  # leaves the blob in warm/
        print(f"first instance: {first['seconds']:.1f} s, {first['misses']:.0f} kernels "
              "compiled", flush=True)
        cold, warm = [], []
        for index in range(args.rounds):
            cold_outputs = scratch / f"cold-{index}"
            cold.append(sample(model, cold_outputs, scratch))
            warm.append(sample(model, warm_outputs, scratch))
            print(f"round {index + 1}: cold {cold[-1]['seconds']:.1f} s "
                  f"({cold[-1]['misses']:.0f} compiled), warm {warm[-1]['seconds']:.1f} s "
                  f"({warm[-1]['hits']:.0f} cached, {warm[-1]['misses']:.0f} compiled)",
                  flush=True)
    cold_s = statistics.median(s["seconds"] for s in cold)
    warm_s = statistics.median(s["seconds"] for s in warm)
    print(f"\nstart-up to ready, median of {args.rounds}: without the cache {cold_s:.1f} s, "
          f"with it {warm_s:.1f} s: ratio {warm_s / cold_s:.2f}")


if __name__ == "__main__":
    main()
