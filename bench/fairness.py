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
   requests, against the baseline of 1;
5. on a second engine bounded at ``--bound`` buffered records (MAX_BUFFERED_RECORDS), quiet
   conversations' voice latency (``--bound-samples`` of them, one request each, published
   together), alone and beside one conversation flooding ``--bound-flood`` voice requests
   (more than the bound), the quiet ones on other partitions than the flood;
6. a live image of conversation C published right after a background image of C while
   ``--chats`` conversations keep the GPU busy (``--chat-images`` images each,
   ``--chat-size``², ``--chat-steps`` steps): its latency (publish → completed) against a
   live image of a conversation with nothing ahead of it, under the same load.

Each backlog is withdrawn afterwards with ``generation.control`` cancels. ``--only 5,6``
runs some scenarios (1 comes with 2 and 4; 5 and 6 measure their own baselines).

Usage: .venv/bin/python bench/fairness.py [--images 100] [--size 1024] [--steps 20]
       [--only 1,2,3,4,5,6]
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
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from aiokafka.partitioner import DefaultPartitioner

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._kafka import PARTITIONS, bench_kafka, engine_env
from tests.support.engine_process import EngineProcess
from tests.support.kafka_client import Answer, PersonaPeer

MS = 1000.0
Report = list[str]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def voice(conversation: str) -> dict[str, Any]:
    return {"request_id": str(uuid.uuid4()), "conversation_id": conversation,
            "text": "Hello, I'm Sarah! How was your day?", "inject_emotion": False}


def image(conversation: str, size: int, steps: int, **fields: Any) -> dict[str, Any]:
    return {"request_id": str(uuid.uuid4()), "conversation_id": conversation,
            "prompt": "a portrait of a woman in a cafe", "width": size,
            "height": size, "num_inference_steps": steps, "optimize_prompt": False,
            **fields}


def partition_of(key: str) -> int:
    """The partition the producer's default partitioner gives ``key`` on the bench topics."""
    partitions = list(range(PARTITIONS))
    return int(DefaultPartitioner()(key.encode(), partitions, partitions))


def keys_off(partition: int, count: int, tag: str) -> list[str]:
    """``count`` conversation ids whose records go to partitions other than ``partition``."""
    return [k for k in (f"{tag}-{i}" for i in range(1000))
            if partition_of(k) != partition][:count]


async def latency(peer: PersonaPeer, kind: str, request: dict[str, Any]) -> float:
    """Publish → completed event of ``request``, in seconds."""
    started = time.perf_counter()
    await peer.publish(kind, request)
    answer = (await peer.answers_for([request["request_id"]], timeout=600))[
        request["request_id"]]
    assert answer.kind == "completed", answer.event
    return answer.received_at - started


async def voice_latencies(peer: PersonaPeer, conversations: list[str]) -> list[float]:
    return [await latency(peer, "voice", voice(c)) for c in conversations]


def tagged(tag: str, samples: int) -> list[str]:
    return [f"{tag}-{i}" for i in range(samples)]


def first_step(peer: PersonaPeer, request_id: str) -> Answer | None:
    return next((a for a in peer.answers
                 if a.kind == "progress" and a.event["request_id"] == request_id), None)


async def withdraw(peer: PersonaPeer, requests: list[dict[str, Any]]) -> None:
    for conversation in {r["conversation_id"] for r in requests}:
        await peer.publish("control", {"action": "cancel", "conversation_id": conversation})
    await peer.answers_for([r["request_id"] for r in requests], timeout=600)


def answered(peer: PersonaPeer, ids: set[str]) -> int:
    return len({a.event["request_id"] for a in peer.answers
                if a.kind in ("completed", "failed") and a.event.get("request_id") in ids})


def row(name: str, values: list[float], base: list[float] | None = None) -> str:
    ratio = f"{pct(values, .5) / pct(base, .5):10.2f}{pct(values, .99) / pct(base, .99):10.2f}" \
        if base else f"{1:10.2f}{1:10.2f}"
    return (f"{name:40}{pct(values, .5) * MS:10.1f}{pct(values, .99) * MS:10.1f}"
            f"{max(values) * MS:10.1f}{ratio}")


HEADER = f"{'voice latency':40}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}{'x p50':>10}{'x p99':>10}"


@asynccontextmanager
async def engine(bootstrap: str, prefix: str, workdir: Path,
                 **extra: str) -> AsyncIterator[PersonaPeer]:
    """A `serve` subprocess on ``prefix``'s topics (local voice, the tiny model) and a peer
    whose group has joined and whose voice is warm."""
    process = EngineProcess(engine_env(
        bootstrap, prefix, workdir, 5, VOICE_BACKEND="local", FLUX_MAX_SEQUENCE_LENGTH="64",
        PROGRESS_INTERVAL="0", **extra), workdir, "bench-engine")
    await process.start(timeout=60)
    try:
        async with PersonaPeer(bootstrap, prefix) as peer:
            await voice_latencies(peer, tagged("warm", 3))
            yield peer
    finally:
        process.send_signal(signal.SIGTERM)
        await process.wait(timeout=120)


async def busy_voice(peer: PersonaPeer, args: argparse.Namespace, alone: list[float],
                     ) -> Report:
    """Scenario 2: voice beside ``--images`` images queued on the GPU."""
    backlog = [image(f"img-{i % 10}", args.size, args.steps) for i in range(args.images)]
    for request in backlog:
        await peer.publish("image", request)
    await peer.wait_for(lambda a: a.kind == "progress", timeout=120)
    busy = await voice_latencies(peer, tagged("busy", args.samples))
    await withdraw(peer, backlog)
    return [row(f"2. {args.images} images queued ({args.size}x{args.size})", busy, alone)]


async def live_behind_replay(peer: PersonaPeer, args: argparse.Namespace) -> Report:
    """Scenario 3: an interactive image behind ``--images`` background ones."""
    replay = [image(f"replay-{i}", args.size, args.steps, priority="background")
              for i in range(args.images)]
    for request in replay:
        await peer.publish("image", request)
    replay_ids = {r["request_id"] for r in replay}
    await peer.wait_for(lambda a: a.kind == "progress"
                        and a.event["request_id"] in replay_ids, timeout=120)
    live = image("live", args.size, args.steps)
    published = time.perf_counter()
    await peer.publish("image", live)
    await peer.wait_for(lambda a: a.kind == "progress"
                        and a.event["request_id"] == live["request_id"], timeout=600)
    live_start = first_step(peer, live["request_id"])
    assert live_start is not None
    wait = live_start.received_at - published
    begun = [s for r in replay if (s := first_step(peer, r["request_id"])) is not None]
    meanwhile = sum(1 for s in begun if published < s.received_at < live_start.received_at)
    done = (await peer.answers_for([live["request_id"]], timeout=600))[live["request_id"]]
    call = done.received_at - live_start.received_at  # one GPU call, measured here
    await withdraw(peer, replay)
    return [(f"3. interactive image ({args.size}x{args.size}, {args.steps} steps) behind "
             f"{args.images} background: starts after "
            f"{wait:.2f} s, {meanwhile} background image(s) started meanwhile; one GPU call "
            f"{call:.2f} s (wait / call {wait / call:.2f})")]


async def together(peer: PersonaPeer, conversations: list[str]) -> list[float]:
    """One voice request of each of ``conversations``, published at once: each one's
    publish → completed event, in seconds."""
    requests = [voice(c) for c in conversations]
    started = {}
    for request in requests:
        started[request["request_id"]] = time.perf_counter()
        await peer.publish("voice", request)
    answers = await peer.answers_for(list(started), timeout=600)
    assert all(a.kind == "completed" for a in answers.values())
    return [answers[i].received_at - started[i] for i in started]


async def quiet_beside_flood(peer: PersonaPeer, flood_size: int,
                             measure: Callable[[], Awaitable[list[float]]],
                             ) -> tuple[list[float], int]:
    """The latencies ``measure`` gives while one conversation floods ``flood_size`` voice
    requests (its first one answered), and how many of the flood were still unanswered
    when ``measure`` ended."""
    flood = [voice("flood") for _ in range(flood_size)]
    for request in flood:
        await peer.publish("voice", request)
    flood_ids = {r["request_id"] for r in flood}
    await peer.wait_for(lambda a: a.event.get("request_id") in flood_ids, timeout=120)
    latencies = await measure()
    left = flood_size - answered(peer, flood_ids)
    await peer.answers_for(list(flood_ids), timeout=600)
    return latencies, left


async def bounded_flood(bootstrap: str, prefix: str, workdir: Path,
                        args: argparse.Namespace) -> Report:
    """Scenario 5: on an engine bounded at ``--bound`` records, quiet conversations (on other
    partitions) beside a flood of ``--bound-flood`` voice requests, against themselves
    alone."""
    quiet = keys_off(partition_of("flood"), args.bound_samples, "quiet5")
    async with engine(bootstrap, prefix, workdir, MAX_BUFFERED_RECORDS=str(args.bound),
                      MAX_BATCH_SIZE=str(args.batch)) as peer:
        alone = await together(peer, quiet)
        beside, left = await quiet_beside_flood(peer, args.bound_flood,
                                                lambda: together(peer, quiet))
    return [(f"MAX_BUFFERED_RECORDS={args.bound}, the flood on partition "
            f"{partition_of('flood')}, the quiet ones on "
            f"{sorted({partition_of(k) for k in quiet})}"), HEADER,
            row("5. quiet alone (baseline)", alone),
            row(f"5. quiet beside a {args.bound_flood} flood", beside, alone),
            f"   {left} of the flood still unanswered after the last quiet answer"]


async def live_after_own_background(peer: PersonaPeer, args: argparse.Namespace) -> Report:
    """Scenario 6: a live image of C right after a background image of C, while
    ``--chats`` conversations keep the GPU busy, against a live image with nothing of its
    conversation ahead of it under the same load."""
    async def under_load(tag: str, publish: Callable[[], Any]) -> tuple[float, int]:
        busy = [image(f"{tag}-busy-{c}", args.chat_size, args.chat_steps)
                for _ in range(args.chat_images) for c in range(args.chats)]
        for request in busy:
            await peer.publish("image", request)
        busy_ids = {r["request_id"] for r in busy}
        await peer.wait_for(lambda a: a.kind == "completed"
                            and a.event["request_id"] in busy_ids, timeout=120)
        before = answered(peer, busy_ids)
        took = await publish()
        done = answered(peer, busy_ids) - before
        await withdraw(peer, busy)
        return took, done

    size, steps = args.chat_size, args.chat_steps
    alone, alone_busy = await under_load(
        "base", lambda: latency(peer, "image", image("live-alone", size, steps)))

    async def behind_own() -> float:
        background = image("live-c", size, steps, priority="background")
        await peer.publish("image", background)
        took = await latency(peer, "image", image("live-c", size, steps))
        assert (await peer.answers_for([background["request_id"]], timeout=600))[
            background["request_id"]].kind == "completed"
        return took

    behind, behind_busy = await under_load("own", behind_own)
    load = args.chats * args.chat_images
    return [(f"6. live image, {args.chats} chats busy ({load} images {size}x{size} "
            f"{steps} steps): alone {alone:.2f} s ({alone_busy} busy images done meanwhile); "
            f"right after its own background image {behind:.2f} s ({behind_busy} busy images "
            f"done meanwhile); ratio {behind / alone:.2f}")]


async def run(bootstrap: str, prefixes: list[str], workdir: Path,
              args: argparse.Namespace) -> None:
    only = args.only
    report: Report = [(f"tiny dev model on {os.cpu_count()} cores, voice local, "
                      f"MAX_BATCH_SIZE={args.batch}, scenarios {sorted(only)}")]
    if only & {1, 2, 3, 4, 6}:
        async with engine(bootstrap, prefixes[0], workdir,
                          MAX_BATCH_SIZE=str(args.batch)) as peer:
            alone: list[float] = []
            if only & {1, 2, 4}:
                alone = await voice_latencies(peer, tagged("alone", args.samples))
                report += [HEADER, row("1. alone (baseline)", alone)]
            if 2 in only:
                report += await busy_voice(peer, args, alone)
            if 4 in only:
                quiet, _ = await quiet_beside_flood(peer, args.flood, lambda: voice_latencies(
                    peer, tagged("quiet", args.samples // 3)))
                report.append(row(f"4. quiet, beside a {args.flood} flood", quiet, alone))
            if 3 in only:
                report += await live_behind_replay(peer, args)
            if 6 in only:
                report += await live_after_own_background(peer, args)
            if alone:
                report.append(f"mean voice alone {statistics.mean(alone) * MS:.1f} ms")
    if 5 in only:
        report += await bounded_flood(bootstrap, prefixes[1], workdir, args)
    print("\n".join(report))


def scenarios(text: str) -> set[int]:
    chosen = {int(part) for part in text.split(",") if part.strip()}
    if not chosen or not chosen <= set(range(1, 7)):
        raise argparse.ArgumentTypeError(f"--only takes scenarios 1 to 6, got {text!r}")
    return chosen


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", type=scenarios, default=set(range(1, 7)),
                        help="comma-separated scenarios to run (default: all)")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1, help="MAX_BATCH_SIZE of the engine")
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--flood", type=int, default=150, help="voice requests of one "
                        "conversation (scenario 4)")
    parser.add_argument("--bound", type=int, default=50,
                        help="MAX_BUFFERED_RECORDS of scenario 5's engine")
    parser.add_argument("--bound-flood", type=int, default=300,
                        help="voice requests of the flooding conversation (scenario 5)")
    parser.add_argument("--bound-samples", type=int, default=8,
                        help="quiet conversations of scenario 5")
    parser.add_argument("--chats", type=int, default=4, help="busy chats (scenario 6)")
    parser.add_argument("--chat-images", type=int, default=8,
                        help="images queued by each busy chat (scenario 6)")
    parser.add_argument("--chat-size", type=int, default=256)
    parser.add_argument("--chat-steps", type=int, default=8)
    args = parser.parse_args()
    prefixes = [f"bench{uuid.uuid4().hex[:6]}.", f"bench{uuid.uuid4().hex[:6]}."]
    with tempfile.TemporaryDirectory() as tmp:
        async with bench_kafka(prefixes) as kafka:
            await run(kafka.bootstrap, prefixes, Path(tmp), args)


if __name__ == "__main__":
    asyncio.run(main())
