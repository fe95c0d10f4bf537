"""The ElevenLabs voice service versus the bare upstream call, against the local ElevenLabs.

The local ElevenLabs (tests/support/elevenlabs_server) runs in its own process, so that its
work does not share our event loop. Measures:

- latency, one request at a time, at 0 ms and 100 ms of server latency: p50/p99 of a bare
  ``httpx`` POST (what any client pays), of ``VoiceService.generate`` (emotion rules,
  request building, the POST, the atomic file write with fsync, the duration read), and of
  the server's own time (its ``Server-Timing`` header); "added" is service minus bare call;
- throughput: 20 conversations at once, each sending its requests in order, at 100 ms of
  server latency, with ELEVENLABS_MAX_CONCURRENCY 4 (the default) and 20; the bound is
  concurrency / latency.

Usage: .venv/bin/python bench/voice_elevenlabs.py [--samples 200] [--per-conversation 10]
Prints a table and the ratios; figures are recorded in docs/voice.md.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from pydantic import SecretStr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.outputs import OutputStore
from core.voice import (
    ElevenLabsBackend,
    RulesEmotionInjector,
    VoiceJob,
    VoiceService,
)
from tests.support.elevenlabs_server import DEFAULT_KEY

VOICE = "21m00Tcm4TlvDq8ikWAM"
TEXTS = [f"Hello, I'm Sarah! How can I help you today? This is line {i}." for i in range(20)]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class LocalElevenLabs:
    """The local ElevenLabs in a subprocess."""

    def __init__(self, latency: float) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.elevenlabs_server", "--port", "0",
             "--latency", str(latency)],
            cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.PIPE, text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        found = re.search(r"(http://\S+/v1)", line)
        if found is None:
            self.process.kill()
            raise RuntimeError(f"the local ElevenLabs did not start: {line!r}")
        self.api_url = found.group(1)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def service_for(http: httpx.AsyncClient, api_url: str, workdir: Path, concurrency: int
                ) -> VoiceService:
    backend = ElevenLabsBackend(http, api_url, SecretStr(DEFAULT_KEY),
                                max_concurrency=concurrency)
    store = OutputStore(Path(tempfile.mkdtemp(dir=workdir)), cleanup_delay=None)
    return VoiceService(backend, store, VOICE)


async def bare(http: httpx.AsyncClient, api_url: str, text: str) -> tuple[float, float]:
    """(client seconds, server seconds) of one bare POST."""
    started = time.perf_counter()
    response = await http.post(
        f"{api_url}/text-to-speech/{VOICE}", params={"output_format": "mp3_44100_128"},
        json={"text": text, "model_id": "eleven_multilingual_v2"},
        headers={"xi-api-key": DEFAULT_KEY},
    )
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    timing = re.search(r"dur=([\d.]+)", response.headers.get("server-timing", ""))
    return elapsed, float(timing.group(1)) / 1000 if timing else float("nan")


async def latency(latency_s: float, samples: int, workdir: Path) -> dict[str, list[float]]:
    server = LocalElevenLabs(latency_s)
    try:
        async with httpx.AsyncClient() as http:
            service = service_for(http, server.api_url, workdir, 4)
            # the bare call sends what the service sends: the text after the emotion rules
            spoken = {text: RulesEmotionInjector().apply(text, False).text for text in TEXTS}
            for text in TEXTS:  # warm: the server caches its audio per text
                await service.generate(VoiceJob(text))
                await bare(http, server.api_url, spoken[text])
            times: dict[str, list[float]] = {"bare": [], "server": [], "service": []}
            for i in range(samples):
                text = TEXTS[i % len(TEXTS)]
                client, own = await bare(http, server.api_url, spoken[text])
                times["bare"].append(client)
                times["server"].append(own)
                started = time.perf_counter()
                await service.generate(VoiceJob(text))
                times["service"].append(time.perf_counter() - started)
            return times
    finally:
        server.stop()


async def throughput(
    per_conversation: int, concurrency: int, workdir: Path
) -> tuple[float, float, int]:
    """(service req/s, bare req/s under the same concurrency limit, requests)."""
    server = LocalElevenLabs(0.1)
    try:
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
        async with httpx.AsyncClient(limits=limits) as http:
            service = service_for(http, server.api_url, workdir, concurrency)
            spoken = {text: RulesEmotionInjector().apply(text, False).text for text in TEXTS}
            for text in TEXTS:
                await service.generate(VoiceJob(text))
            slots = asyncio.Semaphore(concurrency)

            async def bare_call(text: str) -> None:
                async with slots:
                    await bare(http, server.api_url, spoken[text])

            async def conversation(c: int, use_service: bool) -> None:
                for i in range(per_conversation):
                    text = TEXTS[(c + i) % len(TEXTS)]
                    await (service.generate(VoiceJob(text)) if use_service else bare_call(text))

            rates = []
            for use_service in (True, False):
                started = time.perf_counter()
                await asyncio.gather(*(conversation(c, use_service) for c in range(20)))
                rates.append(20 * per_conversation / (time.perf_counter() - started))
            return rates[0], rates[1], 20 * per_conversation
    finally:
        server.stop()


def ms(values: list[float], q: float) -> str:
    return f"{pct(values, q) * 1000:8.2f}"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--per-conversation", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        print("latency (ms)            p50      p99")
        for latency_s in (0.0, 0.1):
            samples = args.samples if latency_s == 0 else max(20, args.samples // 4)
            times = await latency(latency_s, samples, workdir)
            added = [s - b for s, b in zip(times["service"], times["bare"], strict=True)]
            label = f"{latency_s * 1000:.0f} ms server"
            print(f"{label:<14}server {ms(times['server'], .5)} {ms(times['server'], .99)}")
            print(f"{'':<14}bare   {ms(times['bare'], .5)} {ms(times['bare'], .99)}")
            print(f"{'':<14}service{ms(times['service'], .5)} {ms(times['service'], .99)}")
            print(f"{'':<14}added  {ms(added, .5)} {ms(added, .99)}   (n={samples})")
            print(f"{'':<14}ratio service/bare p50 {pct(times['service'], .5) / pct(times['bare'], .5):.2f}, "
                  f"p99 {pct(times['service'], .99) / pct(times['bare'], .99):.2f}")
        print("\nthroughput, 20 conversations, 100 ms server latency")
        for concurrency in (4, 20):
            rate, bare_rate, total = await throughput(args.per_conversation, concurrency,
                                                      workdir)
            bound = concurrency / 0.1
            print(f"  max_concurrency {concurrency:>2}: service {rate:6.1f} req/s, bare "
                  f"{bare_rate:6.1f} req/s ({total} requests each); bound {bound:.0f} req/s; "
                  f"service/bare {rate / bare_rate:.2f}, service/bound {rate / bound:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
