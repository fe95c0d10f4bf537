"""Streamed voice: how soon after publishing a request its audio can start playing.

One run, on the embedded broker (or KAFKA_BOOTSTRAP_SERVERS), against the local
ElevenLabs server (tests/support) streaming its first chunk after --first-chunk seconds
(0.3 by default, as Flash and Turbo measure) and then a chunk every --chunk-interval; the
engine is a `multimodal-engine serve` subprocess on the ElevenLabs backend. For each of
--requests voice requests, one at a time, the Persona side publishes the request, reads
the `generation.progress` event carrying `stream_url`, GETs it and reads its first bytes,
then waits for `generation.completed`. Figures, p50 and p99, from the publish:

- upstream first chunk: when the local server wrote its first chunk (`first_chunk_at`);
- progress event: when the event with `stream_url` was read from Kafka;
- first audio byte: when the first bytes of the stream were read over HTTP;
- completed event: when `generation.completed` was read;

and per request, first audio byte minus upstream first chunk: what the engine, Kafka and
HTTP add before the first audio (the aim: within 50 ms at p50), with its two parts
(upstream chunk → progress event read; progress event → first byte). The server's own
time to first chunk (request arrival → first chunk) is printed beside them.

Usage: .venv/bin/python bench/voice_stream.py [--requests 100] [--first-chunk 0.3]
Figures are recorded in docs/voice.md ("Streaming: time to first audio") and
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._kafka import bench_kafka, engine_env
from tests.support.elevenlabs_server import DEFAULT_KEY, ElevenLabsServer
from tests.support.engine_process import EngineProcess
from tests.support.kafka_client import PersonaPeer

TEXT = "Hello, I'm Sarah! It is so good to hear from you. How was your day?"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Sample:
    """One request's moments, in seconds after its publish."""

    def __init__(self) -> None:
        self.upstream_first = 0.0
        self.upstream_own = 0.0  # the server's: request arrival → first chunk
        self.progress = 0.0
        self.first_byte = 0.0
        self.completed = 0.0
        self.stream_bytes = 0


async def one_request(peer: PersonaPeer, server: ElevenLabsServer, session: aiohttp.ClientSession,
                      engine_url: str, i: int) -> Sample:
    request_id = str(uuid.uuid4())
    sample = Sample()
    chunks_before = len(server.first_chunk_at)
    calls_before = len(server.tts_requests())
    published_perf, published_mono = time.perf_counter(), time.monotonic()
    await peer.publish("voice", {"request_id": request_id, "conversation_id": f"bench-{i % 8}",
                                 "text": f"{TEXT} Number {i}.", "inject_emotion": False})
    (progress,) = await peer.wait_for(
        lambda a: a.kind == "progress" and a.event.get("request_id") == request_id)
    sample.progress = progress.received_at - published_perf
    path = urlsplit(progress.event["stream_url"]).path  # one address: this engine's
    async with session.get(engine_url + path) as response:
        first = await response.content.readany()
        sample.first_byte = time.perf_counter() - published_perf
        sample.stream_bytes = len(first) + len(await response.read())
    answer = (await peer.answers_for([request_id]))[request_id]
    if answer.kind != "completed":
        raise RuntimeError(f"request {i} failed: {answer.event}")
    sample.completed = answer.received_at - published_perf
    assert len(server.first_chunk_at) == chunks_before + 1
    sample.upstream_first = server.first_chunk_at[-1] - published_mono
    call = server.tts_requests()[calls_before]
    sample.upstream_own = server.first_chunk_at[-1] - call.at
    return sample


async def run(args: argparse.Namespace, bootstrap: str, prefix: str, workdir: Path
              ) -> list[Sample]:
    server = ElevenLabsServer(time_to_first_chunk=args.first_chunk,
                              chunk_interval=args.chunk_interval, chunk_bytes=args.chunk_bytes)
    api_url = await server.start()
    engine = EngineProcess(engine_env(
        bootstrap, prefix, workdir, args.fetch_wait_ms, VOICE_BACKEND="elevenlabs",
        ELEVENLABS_API_KEY=DEFAULT_KEY, ELEVENLABS_API_URL=api_url, VOICE_STREAM_INSTANCE="bench",
    ), workdir, "bench-engine")
    engine_url = await engine.start()
    try:
        async with PersonaPeer(bootstrap, prefix) as peer, aiohttp.ClientSession() as session:
            for i in range(args.warmup):  # the group join, the first connections
                await one_request(peer, server, session, engine_url, -1 - i)
            return [await one_request(peer, server, session, engine_url, i)
                    for i in range(args.requests)]
    finally:
        await engine.stop()
        await server.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--first-chunk", type=float, default=0.3)
    parser.add_argument("--chunk-interval", type=float, default=0.02)
    parser.add_argument("--chunk-bytes", type=int, default=4096)
    parser.add_argument("--fetch-wait-ms", type=int, default=5)
    args = parser.parse_args()
    prefix = f"bench{uuid.uuid4().hex[:6]}."
    with tempfile.TemporaryDirectory() as tmp:
        async with bench_kafka([prefix]) as kafka:
            samples = await run(args, kafka.bootstrap, prefix, Path(tmp))
    ms = 1000.0

    def row(name: str, values: list[float]) -> str:
        return f"{name:42}{pct(values, .5) * ms:10.1f}{pct(values, .99) * ms:10.1f}"

    print(f"broker: {kafka.describe()}; upstream time to first "
          f"chunk {args.first_chunk * ms:.0f} ms, then {args.chunk_bytes} B every "
          f"{args.chunk_interval * ms:.0f} ms; {args.requests} requests one at a time; "
          f"cores: {os.cpu_count()}")
    print(f"{'from publishing the request to':42}{'p50 ms':>10}{'p99 ms':>10}")
    print(row("  upstream's first chunk (first_chunk_at)", [s.upstream_first for s in samples]))
    print(row("  progress event with stream_url read", [s.progress for s in samples]))
    print(row("  first audio byte read from stream_url", [s.first_byte for s in samples]))
    print(row("  completed event read", [s.completed for s in samples]))
    print(row("first audio byte - upstream's first chunk",
              [s.first_byte - s.upstream_first for s in samples]))
    print(row("  of which: chunk -> progress event read",
              [s.progress - s.upstream_first for s in samples]))
    print(row("  of which: progress event -> first byte",
              [s.first_byte - s.progress for s in samples]))
    print(row("upstream's own time to first chunk", [s.upstream_own for s in samples]))
    gap = pct([s.first_byte - s.upstream_first for s in samples], .5) * ms
    print(f"aim (first audio within 50 ms of upstream's first chunk, p50): "
          f"{'met' if gap <= 50 else 'missed'} ({gap:.1f} ms); mean stream "
          f"{sum(s.stream_bytes for s in samples) / len(samples) / 1024:.1f} KiB")


if __name__ == "__main__":
    asyncio.run(main())
