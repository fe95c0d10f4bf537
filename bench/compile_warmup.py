"""Start-up compilation and the first images after ready: eager, whole-transformer and
regional compilation, on the development model (a CPU is enough).

For each mode, in a fresh process (torch.compile's caches are per process) with an empty
Inductor cache (``--warm-cache`` keeps the user's), it measures what an instance does:
load the model, make the warm-up images (:mod:`core.image.warmup`, which compiles), then,
as requests would after ``/health/ready`` says 200: the first image, a second, the first
image with a LoRA after those without, back to the base model, and images at other sizes
and batch sizes; with the graphs torch compiled during each.

- ``eager``: COMPILE_TRANSFORMER=false.
- ``full``: the hotswap slot, then ``transformer.compile(dynamic=True)``: the whole
  transformer as one region (what the engine did before regional compilation, with its
  dynamic shapes and silenced slot, so that only the scope differs).
- ``regional``: what COMPILE_TRANSFORMER=true does now (:func:`core.image.loader._compile`).

``--blocks 19,38`` swaps in a transformer of the development model's widths with
FLUX.1-dev's 19 double and 38 single blocks: the block count is what whole-transformer
compilation pays for and regional compilation does not.

Usage: .venv/bin/python bench/compile_warmup.py [--modes eager,full,regional]
       [--size 1024] [--steps 4] [--blocks 1,1] [--warm-cache] [--json out.json]
Prints a Markdown table; figures are recorded in docs/image.md ("Compiled transformer").
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

_MODES = ("eager", "full", "regional")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default=",".join(_MODES))
    parser.add_argument("--size", type=int, default=1024, help="image side (the default)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--blocks", default="1,1", help="double,single transformer blocks")
    parser.add_argument("--warm-cache", action="store_true",
                        help="keep the Inductor cache (default: an empty one per mode)")
    parser.add_argument("--json", type=Path, help="write the rows here too")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a mode, in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(asyncio.run(measure(args.one, args))), flush=True)
        return
    rows = [run_mode(mode, args) for mode in args.modes.split(",")]
    print_table(rows, args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


def run_mode(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """``mode`` measured in a process of its own (and an Inductor cache of its own)."""
    if mode not in _MODES:
        raise SystemExit(f"--modes: unknown mode {mode!r} (known: {', '.join(_MODES)})")
    with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
        env = dict(os.environ)
        if not args.warm_cache:
            env["TORCHINDUCTOR_CACHE_DIR"] = cache
        command = [sys.executable, __file__, "--one", mode, "--size", str(args.size),
                   "--steps", str(args.steps), "--blocks", args.blocks]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{done.stderr[-3000:]}")
    row: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{mode}: {row}", file=sys.stderr, flush=True)
    return row


async def measure(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from core.image import GpuWorker, build_dev_model
    from core.image.warmup import compiled_graphs, warm_up
    from core.lora import LoraRegistry

    with tempfile.TemporaryDirectory(prefix="bench-compile-") as scratch:
        directory = Path(scratch)
        model_dir = build_dev_model(directory / "model")
        started = time.perf_counter()
        model, lora_file = load(mode, model_dir, args.blocks, directory)
        loaded = time.perf_counter() - started
        lora = LoraRegistry(directory / "loras").register(
            "character", lora_file, trigger_word=None, base_model=None)
        worker = GpuWorker(model, max_batch_size=4, batch_window_ms=0, lora_cache_size=4,
                           vae_tiling_threshold=4096, max_sequence_length=512)
        worker.start()
        try:
            warmed = await warm_up(worker, size=args.size, max_batch_size=4)
            row: dict[str, Any] = {
                "mode": mode, "blocks": args.blocks, "size": args.size, "steps": args.steps,
                "threads": torch.get_num_threads(), "load_s": round(loaded, 2),
                "warm_up_s": round(warmed.seconds, 2), "warm_up_graphs": warmed.graphs,
                "warm_up_images": [dataclasses.asdict(image) for image in warmed.images]}
            graphs = compiled_graphs()
            for label, job in (
                ("first image", _job(args, None)),
                ("second image", _job(args, None)),
                ("first LoRA image", _job(args, lora)),
                ("back to base", _job(args, None)),
                ("768x512, batch of 3", _job(args, None, size=(768, 512), count=3)),
                ("512x1024, LoRA, batch of 2", _job(args, lora, size=(512, 1024), count=2)),
            ):
                before = compiled_graphs()
                began = time.perf_counter()
                await worker.generate_all(job)
                row[label] = {"s": round(time.perf_counter() - began, 3),
                              "graphs": compiled_graphs() - before}
            row["graphs_after_ready"] = compiled_graphs() - graphs
        finally:
            worker.stop()
    return row


def load(mode: str, model_dir: Path, blocks: str, directory: Path) -> tuple[Any, Path]:
    """The development model prepared as ``mode`` says (``--blocks`` deep), and a LoRA
    for it, drawn before any slot wraps its layers."""
    import diffusers
    import torch.fx.experimental._config as fx_config

    from core.image.loader import prepare_model
    from core.lora.adapters import HOTSWAP_SLOT, prepare_hotswap_slot

    pipeline_class: Any = diffusers.FluxPipeline
    pipeline = pipeline_class.from_pretrained(model_dir, local_files_only=True)
    double, single = (int(part) for part in blocks.split(","))
    if (double, single) != (1, 1):
        config = dict(pipeline.transformer.config)
        config.update(num_layers=double, num_single_layers=single)
        transformer_class: Any = diffusers.FluxTransformer2DModel
        pipeline.register_modules(transformer=transformer_class.from_config(config).eval())
    lora_file = _random_lora(pipeline.transformer, directory)
    model = prepare_model(pipeline, name="flux-tiny-dev", path=model_dir,
                          development_model=True, device="cpu",
                          compile_transformer=mode == "regional")
    if mode == "full":
        prepare_hotswap_slot(pipeline, rank=16, slot=HOTSWAP_SLOT)
        fx_config.use_duck_shape = False
        pipeline.transformer.compile(dynamic=True)
        model = dataclasses.replace(model, compiled=True, hotswap_slot=HOTSWAP_SLOT)
    return model, lora_file


def _random_lora(transformer: Any, directory: Path) -> Path:
    """A rank-16 LoRA on the attention projections, drawn before any slot wraps them."""
    from core.image.random_flux import write_random_lora

    lora_dir = directory / "made"
    lora_dir.mkdir()
    written: Path = write_random_lora(transformer, lora_dir / "character.safetensors",
                                      rank=16, scale=0.05)
    return written


def _job(args: argparse.Namespace, lora: Any, *, size: tuple[int, int] | None = None,
         count: int = 1) -> Any:
    from core.image import ImageJob

    width, height = size or (args.size, args.size)
    return ImageJob(prompt="a lighthouse on a cliff", negative_prompt=None, width=width,
                    height=height, steps=args.steps, guidance=3.5, true_cfg_scale=1.0,
                    seed=1, lora=lora, count=count)


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"\nDevelopment model, {args.blocks} (double,single) blocks, {args.size}² images, "
          f"{args.steps} steps, CPU ({rows[0]['threads']} threads), "
          f"{'warm' if args.warm_cache else 'empty'} Inductor cache\n")
    labels = ("first image", "second image", "first LoRA image", "back to base",
              "768x512, batch of 3", "512x1024, LoRA, batch of 2")
    print("| mode | load s | warm-up s (graphs) | " + " | ".join(labels)
          + " | graphs after ready |")
    print("|---" * (len(labels) + 4) + "|")
    for row in rows:
        cells = [f"{row[label]['s']:.2f}" + (f" (+{row[label]['graphs']})"
                                             if row[label]["graphs"] else "")
                 for label in labels]
        print(f"| {row['mode']} | {row['load_s']:.1f} | {row['warm_up_s']:.1f} "
              f"({row['warm_up_graphs']}) | " + " | ".join(cells)
              + f" | {row['graphs_after_ready']} |")


if __name__ == "__main__":
    main()
