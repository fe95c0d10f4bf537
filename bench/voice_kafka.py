"""Voice through Kafka versus the voice core called directly, in the same run.

Measures, on the embedded broker (or KAFKA_BOOTSTRAP_SERVERS):
- latency: one request at a time; p50/p99 of the core alone, and of publish → completed
  event received through the engine (a `multimodal-engine serve` subprocess); the
  difference is what Kafka and the consume loop add;
- throughput: N requests over C conversations at once, requests per second both ways;
- the read barrier on cancels (CANCEL_BARRIER_SECONDS): a second engine beside the first,
  on its own topics, with the barrier off (0); latency samples alternate between the two,
  so the difference is what the barrier costs a voice request (one offsets lookup per
  fetch, on a connection of its own).

Usage: .venv/bin/python bench/voice_kafka.py [--requests 300] [--latency-samples 100]
Prints a table and the ratios; figures are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._kafka import bench_kafka, engine_env
from core.outputs import OutputStore
from core.voice import EspeakSynthesizer, LocalVoiceBackend, VoiceService
from schemas.events import VoiceRequested
from tests.support.engine_process import EngineProcess
from tests.support.kafka_client import PersonaPeer

TEXT = "Hello, I'm Sarah! How can I help you today?"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def request(i: int, conversations: int) -> dict[str, object]:
    return {"request_id": str(uuid.uuid4()), "conversation_id": f"conv-{i % conversations}",
            "text": f"{TEXT} Number {i}."}


async def direct(args: argparse.Namespace, workdir: Path) -> tuple[list[float], float]:
    store = OutputStore(workdir / "direct", cleanup_delay=None)
    service = VoiceService(LocalVoiceBackend(EspeakSynthesizer()), store, "21m00Tcm4TlvDq8ikWAM")
    latencies = []
    for i in range(args.latency_samples):
        event = VoiceRequested.model_validate(request(i, 1))
        started = time.perf_counter()
        await service.generate(event)
        latencies.append(time.perf_counter() - started)
    semaphore = asyncio.Semaphore(args.concurrency)

    async def one(i: int) -> None:
        async with semaphore:
            await service.generate(VoiceRequested.model_validate(request(i, args.conversations)))

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(args.requests)))
    return latencies, args.requests / (time.perf_counter() - started)


def local_voice_env(args: argparse.Namespace, bootstrap: str, prefix: str, workdir: Path,
                    **extra: str) -> dict[str, str]:
    return engine_env(bootstrap, prefix, workdir, args.fetch_wait_ms, VOICE_BACKEND="local",
                      MAX_IN_FLIGHT_VOICE=str(args.concurrency), **extra)


async def one_request(peer: PersonaPeer, i: int) -> float:
    """Publish → completed event received, for one voice request, in seconds."""
    r = request(i, 1)
    started = time.perf_counter()
    await peer.publish("voice", r)
    answer = (await peer.answers_for([str(r["request_id"])]))[str(r["request_id"])]
    return answer.received_at - started


async def through_kafka(args: argparse.Namespace, bootstrap: str, prefixes: list[str],
                        workdir: Path) -> tuple[list[float], list[float], float]:
    """Two engines side by side, each on its own topics: the read barrier on (the default)
    and off (CANCEL_BARRIER_SECONDS=0). Latency samples alternate between them, one request
    at a time, so both see the same machine; then the throughput of the first."""
    engines = [EngineProcess(local_voice_env(args, bootstrap, prefixes[0], workdir), workdir,
                             "bench-engine"),
               EngineProcess(local_voice_env(args, bootstrap, prefixes[1], workdir,
                                             CANCEL_BARRIER_SECONDS="0"), workdir,
                             "bench-engine-nobarrier")]
    for engine in engines:
        await engine.start()
    try:
        async with PersonaPeer(bootstrap, prefixes[0]) as barred, \
                PersonaPeer(bootstrap, prefixes[1]) as bare:
            for peer in (barred, bare):  # waits for the group joins before timing
                await one_request(peer, 0)
            with_barrier, without = [], []
            for i in range(args.latency_samples):
                order = [(barred, with_barrier), (bare, without)]
                for peer, samples in order if i % 2 else reversed(order):
                    samples.append(await one_request(peer, i))
            engines[1].send_signal(__import__("signal").SIGTERM)  # throughput: one engine
            await engines[1].wait()
            batch = [request(i, args.conversations) for i in range(args.requests)]
            started = time.perf_counter()
            for r in batch:
                await barred.publish("voice", r)
            answers = await barred.answers_for([str(r["request_id"]) for r in batch],
                                               timeout=300)
            finished = max(a.received_at for a in answers.values())
            return with_barrier, without, args.requests / (finished - started)
    finally:
        for engine in engines:
            await engine.stop()  # killed if still running (throughput done or a failure)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--latency-samples", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--conversations", type=int, default=20)
    parser.add_argument("--fetch-wait-ms", type=int, default=5)
    args = parser.parse_args()
    prefix = f"bench{uuid.uuid4().hex[:6]}."
    unbarred = f"{prefix}nobarrier."  # its own topics: nothing of the other run
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        async with bench_kafka([prefix, unbarred]) as kafka:
            core_lat, core_rps = await direct(args, workdir)
            kafka_lat, bare_lat, kafka_rps = await through_kafka(
                args, kafka.bootstrap, [prefix, unbarred], workdir)
    ms = 1000.0
    print(f"broker: {kafka.describe()}, fetch_max_wait_ms="
          f"{args.fetch_wait_ms}, cores: {os.cpu_count()}")
    print(f"{'':24}{'p50 ms':>10}{'p99 ms':>10}{'req/s':>10}")
    print(f"{'core directly':24}{pct(core_lat, .5) * ms:10.1f}{pct(core_lat, .99) * ms:10.1f}"
          f"{core_rps:10.1f}")
    print(f"{'through Kafka':24}{pct(kafka_lat, .5) * ms:10.1f}{pct(kafka_lat, .99) * ms:10.1f}"
          f"{kafka_rps:10.1f}")
    print(f"{'  barrier off':24}{pct(bare_lat, .5) * ms:10.1f}{pct(bare_lat, .99) * ms:10.1f}"
          f"{'':>10}")
    print(f"the read barrier on cancels costs: p50 "
          f"{(pct(kafka_lat, .5) - pct(bare_lat, .5)) * ms:.1f} ms, p99 "
          f"{(pct(kafka_lat, .99) - pct(bare_lat, .99)) * ms:.1f} ms")
    print(f"added latency: p50 {(pct(kafka_lat, .5) - pct(core_lat, .5)) * ms:.1f} ms, "
          f"p99 {(pct(kafka_lat, .99) - pct(core_lat, .99)) * ms:.1f} ms; "
          f"throughput ratio kafka/core {kafka_rps / core_rps:.2f} "
          f"(mean core {statistics.mean(core_lat) * ms:.1f} ms)")


if __name__ == "__main__":
    asyncio.run(main())
