"""Images through Kafka versus a plain diffusers loop on the same model, in the same run.

The engine runs as a `multimodal-engine serve` subprocess on the tiny development model
(embedded Tansu, or KAFKA_BOOTSTRAP_SERVERS); the loop runs in this process, in a fresh
thread (torch's per-thread OpenMP pools skew CPU timings otherwise, see docs/image.md),
never at the same time as the engine. Measures images/s:
- the plain loop, one image per pipeline call;
- through Kafka with MAX_BATCH_SIZE=1 (ratio against the loop; aim >= 0.97);
- through Kafka with MAX_BATCH_SIZE=4 (ratio against the loop; aim >= 1.5).

Usage: .venv/bin/python bench/image_kafka.py [--images 48] [--size 64] [--steps 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._kafka import bench_kafka, engine_env
from core.image import build_dev_model, load_pipeline
from tests.support.engine_process import EngineProcess
from tests.support.kafka_client import PersonaPeer

T = TypeVar("T")


def in_fresh_thread(fn: Callable[[], T]) -> T:
    result: list[T] = []
    thread = threading.Thread(target=lambda: result.append(fn()))
    thread.start()
    thread.join()
    return result[0]


def plain_loop(model_dir: Path, args: argparse.Namespace) -> float:
    import torch

    model = load_pipeline(model_dir, device="cpu", use_fp16=False, memory_mode="none",
                          attention_backend="native", compile_transformer=False)
    pipe = model.pipeline

    def one(seed: int) -> Any:
        return pipe(prompt=f"a portrait number {seed}", width=args.size, height=args.size,
                    num_inference_steps=args.steps, guidance_scale=3.5,
                    generator=torch.Generator().manual_seed(seed), output_type="pil",
                    max_sequence_length=args.max_sequence_length).images[0]

    one(0)  # warm-up
    started = time.perf_counter()
    for i in range(args.images):
        one(i + 1)
    return args.images / (time.perf_counter() - started)


async def through_kafka(bootstrap: str, prefix: str, workdir: Path, batch: int,
                        args: argparse.Namespace) -> float:
    threads = os.environ.get("ENGINE_OMP_THREADS")
    env = engine_env(
        bootstrap, prefix, workdir, 5, VOICE_BACKEND="local", MAX_BATCH_SIZE=str(batch),
        BATCH_WINDOW_MS="20", PROGRESS_INTERVAL="1000",
        FLUX_MAX_SEQUENCE_LENGTH=str(args.max_sequence_length),
        **({"OMP_NUM_THREADS": threads} if threads is not None else {}))
    engine = EngineProcess(env, workdir, f"engine-batch{batch}")
    await engine.start()
    try:
        async with PersonaPeer(bootstrap, prefix) as peer:
            def request(i: int) -> dict[str, Any]:
                return {"request_id": str(uuid.uuid4()), "conversation_id": f"conv-{i}",
                        "prompt": f"a portrait number {i}", "width": args.size,
                        "height": args.size, "num_inference_steps": args.steps,
                        "seed": i, "optimize_prompt": False}
            warm = request(0)
            await peer.publish("image", warm)
            await peer.answers_for([warm["request_id"]], timeout=120)
            batch_requests = [request(i + 1) for i in range(args.images)]
            started = time.perf_counter()
            for r in batch_requests:
                await peer.publish("image", r)
            answers = await peer.answers_for([r["request_id"] for r in batch_requests],
                                             timeout=600)
            assert all(a.kind == "completed" for a in answers.values())
            finished = max(a.received_at for a in answers.values())
            return args.images / (finished - started)
    finally:
        engine.send_signal(signal.SIGTERM)
        await engine.wait(timeout=60)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--max-sequence-length", type=int, default=512)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model_dir = build_dev_model(workdir / "dev-flux")
        loops = [in_fresh_thread(lambda: plain_loop(model_dir, args))]
        prefixes = [f"bench{uuid.uuid4().hex[:6]}." for _ in range(2)]  # batch 1, batch 4
        async with bench_kafka(prefixes) as kafka:
            single = await through_kafka(kafka.bootstrap, prefixes[0], workdir, 1, args)
            loops.append(in_fresh_thread(lambda: plain_loop(model_dir, args)))
            batched = await through_kafka(kafka.bootstrap, prefixes[1], workdir, 4, args)
            loops.append(in_fresh_thread(lambda: plain_loop(model_dir, args)))
    print(f"tiny dev model, {args.size}x{args.size}, {args.steps} steps, {args.images} images, "
          f"{os.cpu_count()} cores, broker {kafka.describe()}")
    # this machine's speed drifts between runs: the loop is measured before, between and
    # after the engine runs, and the ratios use their mean
    loop_rate = sum(loops) / len(loops)
    print(f"plain diffusers loop          {loop_rate:7.2f} images/s  (runs: "
          f"{', '.join(f'{r:.2f}' for r in loops)})")
    print(f"through Kafka, batch 1        {single:7.2f} images/s  ratio {single / loop_rate:.2f}")
    print(f"through Kafka, batches of 4   {batched:7.2f} images/s  ratio {batched / loop_rate:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
