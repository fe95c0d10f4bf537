"""Fairness on one shared engine: voice beside an image backlog, a live image beside a replay.

The engine runs as a `multimodal-engine serve` subprocess on the tiny development model
(embedded Tansu, or KAFKA_BOOTSTRAP_SERVERS). In one run it measures:

1. voice latency (publish → completed event) alone: the baseline;
2. the same with ``--images`` image requests (``--size``², ``--steps`` steps, ten
   conversations) queued on the GPU; the ratio to the baseline;
3. an interactive image published behind ``--images`` background ones: how long until it
   starts (its first progress event), in seconds and in background images started
   meanwhile, against the duration of one GPU call measured in the same run;
4. quiet conversations' voice latency beside one conversation flooding ``--flood`` voice
   requests, against the baseline of 1.

Each backlog is withdrawn afterwards with ``generation.control`` cancels.

Usage: .venv/bin/python bench/fairness.py [--images 100] [--size 1024] [--steps 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._kafka import bench_kafka, engine_env
from tests.support.engine_process import EngineProcess
from tests.support.kafka_client import Answer, PersonaPeer


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def voice(conversation: str) -> dict[str, Any]:
    return {"request_id": str(uuid.uuid4()), "conversation_id": conversation,
            "text": "Hello, I'm Sarah! How was your day?", "inject_emotion": False}


def image(conversation: str, args: argparse.Namespace, **fields: Any) -> dict[str, Any]:
    return {"request_id": str(uuid.uuid4()), "conversation_id": conversation,
            "prompt": "a portrait of a woman in a cafe", "width": args.size,
            "height": args.size, "num_inference_steps": args.steps, "optimize_prompt": False,
            **fields}


async def voice_latencies(peer: PersonaPeer, samples: int, tag: str) -> list[float]:
    latencies = []
    for i in range(samples):
        request = voice(f"{tag}-{i}")
        started = time.perf_counter()
        await peer.publish("voice", request)
        answer = (await peer.answers_for([request["request_id"]], timeout=120))[
            request["request_id"]]
        assert answer.kind == "completed", answer.event
        latencies.append(answer.received_at - started)
    return latencies


def first_step(peer: PersonaPeer, request_id: str) -> Answer | None:
    return next((a for a in peer.answers
                 if a.kind == "progress" and a.event["request_id"] == request_id), None)


async def withdraw(peer: PersonaPeer, requests: list[dict[str, Any]]) -> None:
    for conversation in {r["conversation_id"] for r in requests}:
        await peer.publish("control", {"action": "cancel", "conversation_id": conversation})
    await peer.answers_for([r["request_id"] for r in requests], timeout=600)


async def run(bootstrap: str, prefix: str, workdir: Path, args: argparse.Namespace) -> None:
    engine = EngineProcess(engine_env(
        bootstrap, prefix, workdir, 5, VOICE_BACKEND="local", FLUX_MAX_SEQUENCE_LENGTH="64",
        PROGRESS_INTERVAL="0", MAX_BATCH_SIZE=str(args.batch)), workdir, "bench-engine")
    await engine.start(timeout=60)
    try:
        async with PersonaPeer(bootstrap, prefix) as peer:
            await voice_latencies(peer, 3, "warm")  # group joined, voice warmed up
            alone = await voice_latencies(peer, args.samples, "alone")

            backlog = [image(f"img-{i % 10}", args) for i in range(args.images)]
            for request in backlog:
                await peer.publish("image", request)
            await peer.wait_for(lambda a: a.kind == "progress", timeout=120)
            busy = await voice_latencies(peer, args.samples, "busy")
            await withdraw(peer, backlog)

            replay = [image(f"replay-{i}", args, priority="background")
                      for i in range(args.images)]
            for request in replay:
                await peer.publish("image", request)
            replay_ids = {r["request_id"] for r in replay}
            await peer.wait_for(lambda a: a.kind == "progress"
                                and a.event["request_id"] in replay_ids, timeout=120)
            live = image("live", args)
            published = time.perf_counter()
            await peer.publish("image", live)
            await peer.wait_for(lambda a: a.kind == "progress"
                                and a.event["request_id"] == live["request_id"], timeout=600)
            live_start = first_step(peer, live["request_id"])
            assert live_start is not None
            wait = live_start.received_at - published
            begun = [s for r in replay if (s := first_step(peer, r["request_id"])) is not None]
            meanwhile = sum(1 for s in begun if published < s.received_at < live_start.received_at)
            done = (await peer.answers_for([live["request_id"]], timeout=600))[
                live["request_id"]]
            call = done.received_at - live_start.received_at  # one GPU call, measured here
            await withdraw(peer, replay)

            flood = [voice("flood") for _ in range(args.flood)]
            for request in flood:
                await peer.publish("voice", request)
            flood_ids = {r["request_id"] for r in flood}
            await peer.wait_for(lambda a: a.event.get("request_id") in flood_ids, timeout=120)
            quiet = await voice_latencies(peer, args.samples // 3, "quiet")
            await peer.answers_for(list(flood_ids), timeout=600)
    finally:
        engine.send_signal(signal.SIGTERM)
        await engine.wait(timeout=120)

    ms = 1000.0
    print(f"tiny dev model on {os.cpu_count()} cores, images {args.size}x{args.size} "
          f"{args.steps} steps, MAX_BATCH_SIZE={args.batch}, {args.images} queued")
    print(f"{'voice latency':34}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    for name, values in (("alone (baseline)", alone), (f"{args.images} images queued", busy),
                         (f"quiet, beside a {args.flood} flood", quiet)):
        print(f"{name:34}{pct(values, .5) * ms:10.1f}{pct(values, .99) * ms:10.1f}"
              f"{max(values) * ms:10.1f}")
    print(f"ratio p50 {pct(busy, .5) / pct(alone, .5):.2f}, p99 "
          f"{pct(busy, .99) / pct(alone, .99):.2f} (queued / alone); quiet beside the flood "
          f"p50 {pct(quiet, .5) / pct(alone, .5):.2f}, p99 {pct(quiet, .99) / pct(alone, .99):.2f}")
    print(f"interactive image behind {args.images} background: starts after {wait:.2f} s, "
          f"{meanwhile} background image(s) started meanwhile; one GPU call {call:.2f} s "
          f"(wait / call {wait / call:.2f}); mean voice alone "
          f"{statistics.mean(alone) * ms:.1f} ms")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1, help="MAX_BATCH_SIZE of the engine")
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--flood", type=int, default=150, help="voice requests of one "
                        "conversation")
    args = parser.parse_args()
    prefix = f"bench{uuid.uuid4().hex[:6]}."
    with tempfile.TemporaryDirectory() as tmp:
        async with bench_kafka([prefix]) as kafka:
            await run(kafka.bootstrap, prefix, Path(tmp), args)


if __name__ == "__main__":
    asyncio.run(main())
