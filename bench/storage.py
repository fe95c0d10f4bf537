"""What the shared object store (STORAGE_URL) costs an image and a voice request, against
the local folders alone, in the same run.

On the tests' S3-protocol server (moto's server mode on 127.0.0.1, started here; or
STORAGE_URL and STORAGE_ENDPOINT_URL with AWS_* credentials from the environment), with
files of realistic sizes (a 1024x1024 PNG of smooth noise written by PIL, about 1 MB; a
60 KB voice MP3, random bytes: the store never looks inside), measures p50/p99 of:

- writing an output: ``OutputStore.write`` without a store vs with ``SharedOutputs`` (the
  file is also uploaded before it is reported), interleaved so both see the same machine;
- ``GET /outputs/{file}`` on the real aiohttp app (``http_files.create_app``): time to the
  first byte and to the last, from the instance that made the file (its disk) vs from
  another instance of the fleet (streamed from the store);
- a result-cache lookup as a replay makes it (the entry, then whether its file is still a
  current output, ``core.remembered.looked_up``): no store; the store configured but the
  entry on this instance's disk; and a replay that landed on another instance (entry and
  file checked in the store).

Usage: .venv/bin/python bench/storage.py [--samples 500]   (about 40 s on 2 cores)
Prints a table and the ratios store/local; figures are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
import numpy as np
from aiohttp import web
from PIL import Image
from prometheus_client import CollectorRegistry

from core.health import EngineHealth
from core.metrics import EngineMetrics
from core.outputs import OutputStore
from core.remembered import RememberedResults, looked_up
from core.scheduling import build_scheduling
from core.settings import Settings, load_settings
from core.storage import ObjectStore, SharedOutputs, build_object_store
from core.voice import EspeakSynthesizer, LocalVoiceBackend, VoiceService
from http_files import AppServices, create_app
from schemas.codec import EventCodec

Samples = list[float]


def pct(values: Samples, q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def png_image() -> bytes:
    """A 1024x1024 PNG of bicubic-upscaled noise: compresses like a photo-like image
    (about 1 MB), unlike raw noise (3 MB)."""
    rng = np.random.default_rng(1)
    small = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    small.resize((1024, 1024), Image.Resampling.BICUBIC).save(buffer, "PNG")
    return buffer.getvalue()


def mp3_voice() -> bytes:
    """60 KB: about four seconds of MP3 at 128 kbit/s (contents do not matter here)."""
    return b"ID3" + os.urandom(60_000 - 3)


# --------------------------------------------------------------------------- (a) writes


def timed_writes(a: OutputStore, b: OutputStore, data: bytes, suffix: str, n: int
                 ) -> tuple[Samples, Samples, list[str], list[str]]:
    """n writes to each store, alternating which goes first; the files each wrote."""
    times: tuple[Samples, Samples] = ([], [])
    names: tuple[list[str], list[str]] = ([], [])
    for i in range(n):
        for which in ((0, 1) if i % 2 == 0 else (1, 0)):
            store = (a, b)[which]
            started = time.perf_counter()
            stored = store.write(data, suffix)
            times[which].append(time.perf_counter() - started)
            names[which].append(stored.filename)
    return times[0], times[1], names[0], names[1]


# --------------------------------------------------------------------------- (b) GET


def app_for(store: OutputStore, settings: Settings) -> web.Application:
    """The real HTTP app over ``store`` (the other services are built but not used)."""
    metrics = EngineMetrics(CollectorRegistry())
    return create_app(AppServices(
        health=EngineHealth(voice_backend="local"), metrics=metrics, store=store,
        codec=EventCodec(), scheduling=build_scheduling(settings, metrics),
        voice=VoiceService(LocalVoiceBackend(EspeakSynthesizer()), store,
                           settings.default_voice_id)))


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


async def fetch(session: aiohttp.ClientSession, url: str, size: int) -> tuple[float, float]:
    """Seconds to the first byte of the body and to the last."""
    started = time.perf_counter()
    async with session.get(url) as response:
        assert response.status == 200, (url, response.status)
        received = len(await response.content.readany())
        first = time.perf_counter() - started
        async for chunk in response.content.iter_any():
            received += len(chunk)
    assert received == size, (url, received, size)
    return first, time.perf_counter() - started


async def timed_gets(session: aiohttp.ClientSession, local: str, remote: str,
                     names: list[str], size: int) -> dict[str, Samples]:
    """Each file from the instance that made it and from another one, alternating."""
    times: dict[str, Samples] = {"local first": [], "local whole": [], "store first": [],
                                 "store whole": []}
    for i, name in enumerate(names):
        order = [("local", local), ("store", remote)]
        for where, base in order if i % 2 == 0 else order[::-1]:
            first, whole = await fetch(session, f"{base}/outputs/{name}", size)
            times[f"{where} first"].append(first)
            times[f"{where} whole"].append(whole)
    return times


# --------------------------------------------------------------------------- (c) lookups


def entry(kind: str, filename: str) -> dict[str, Any]:
    """A remembered result of the size the services keep (≈ 300 bytes)."""
    file_id = filename.partition(".")[0]
    if kind == "image":
        return {"image_id": file_id, "filename": filename, "width": 1024, "height": 1024,
                "prompt": "a portrait of a woman in a cafe, soft window light, 35mm, "
                          "shallow depth of field, warm tones, detailed skin texture",
                "seed": 1234567890, "images": []}
    return {"audio_id": file_id, "filename": filename, "duration_seconds": 3.84,
            "spoken": "[warmly] Hello, I'm Sarah! How can I help you today?",
            "settings": {"voice_id": "21m00Tcm4TlvDq8ikWAM", "stability": 0.5,
                         "similarity_boost": 0.75, "style": 0.0, "seed": 42}}


async def timed_lookups(cases: list[tuple[RememberedResults, OutputStore, bool]],
                        keys: list[str]) -> list[Samples]:
    """Each key looked up once in each case, the cases in turns: (results, outputs,
    shared) as the image and voice services call ``looked_up``."""
    times: list[Samples] = [[] for _ in cases]
    for i, key in enumerate(keys):
        order = list(range(len(cases)))
        for which in order[i % len(order):] + order[:i % len(order)]:
            results, outputs, shared = cases[which]
            started = time.perf_counter()
            remembered, current = await looked_up(
                results.get, outputs, key, lambda r: [r["filename"]], shared=shared)
            times[which].append(time.perf_counter() - started)
            assert remembered is not None and current, (which, key)
    return times


def results_in(root: Path, objects: ObjectStore | None, kind: str
                    ) -> RememberedResults:
    return RememberedResults(root, shared=objects, namespace=f"results/{kind}")


# --------------------------------------------------------------------------- run


Row = tuple[str, Samples, Samples]


async def measure(args: argparse.Namespace, objects: ObjectStore, settings: Settings,
                  work: Path) -> list[Row]:
    def store(name: str, shared: bool) -> OutputStore:
        return OutputStore(work / name, cleanup_delay=3600,
                           shared=SharedOutputs(objects) if shared else None)

    plain, maker, other = store("plain", False), store("maker", True), store("other", True)
    files = {"image": (png_image(), "png"), "voice": (mp3_voice(), "mp3")}
    rows: list[Row] = []
    written: dict[str, tuple[list[str], list[str]]] = {}
    for kind, (data, suffix) in files.items():
        timed_writes(plain, maker, data, suffix, 3)  # connections, first-use costs
        local, shared, plain_names, maker_names = timed_writes(
            plain, maker, data, suffix, args.samples)
        written[kind] = plain_names, maker_names
        rows.append((f"write {kind} ({len(data) / 1e3:.0f} KB)", local, shared))

    runners = []
    try:
        maker_runner, maker_url = await serve(app_for(maker, settings))
        runners.append(maker_runner)
        other_runner, other_url = await serve(app_for(other, settings))
        runners.append(other_runner)
        async with aiohttp.ClientSession() as session:
            for kind, (data, _) in files.items():
                names = written[kind][1]
                await timed_gets(session, maker_url, other_url, names[:3], len(data))  # warm
                got = await timed_gets(session, maker_url, other_url, names, len(data))
                rows.append((f"GET {kind}: first byte", got["local first"],
                             got["store first"]))
                rows.append((f"GET {kind}: whole file", got["local whole"],
                             got["store whole"]))
    finally:
        for runner in runners:
            await runner.cleanup()

    for kind in files:
        plain_names, maker_names = written[kind]
        alone = results_in(work / f"{kind}-plain", None, kind)
        made_here = results_in(work / f"{kind}-maker", objects, kind)
        elsewhere = results_in(work / f"{kind}-other", objects, kind)
        keys = []
        for plain_name, maker_name in zip(plain_names, maker_names, strict=True):
            key = uuid.uuid4().hex + uuid.uuid4().hex  # a sha256-long fingerprint
            alone.put(key, entry(kind, plain_name))
            made_here.put(key, entry(kind, maker_name))  # here and in the store
            keys.append(key)
        none, here, moved = await timed_lookups(
            [(alone, plain, False), (made_here, maker, True), (elsewhere, other, True)],
            keys)
        rows.append((f"replay lookup {kind}: same instance", none, here))
        rows.append((f"replay lookup {kind}: other instance", none, moved))
    return rows


def report(rows: list[Row], where: str, samples: int, seconds: float) -> None:
    ms = 1000.0
    print(f"store: {where}; cores: {os.cpu_count()}; {samples} samples per figure; "
          f"{seconds:.0f} s")
    print(f"{'':36}{'local p50':>10}{'p99':>8}{'store p50':>11}{'p99':>8}"
          f"{'ratio p50':>11}{'p99':>7}")
    for name, local, store in rows:
        lp50, lp99, sp50, sp99 = (pct(local, .5), pct(local, .99), pct(store, .5),
                                  pct(store, .99))
        print(f"{name:36}{lp50 * ms:10.2f}{lp99 * ms:8.2f}{sp50 * ms:11.2f}{sp99 * ms:8.2f}"
              f"{sp50 / lp50:11.1f}{sp99 / lp99:7.1f}")
    print("local: no STORAGE_URL (writes, lookups) or the instance that made the file "
          "(GET); store: SharedOutputs, or another instance of the fleet; ms")


async def run(args: argparse.Namespace, url: str, endpoint: str | None, where: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        settings = load_settings(storage_url=url, storage_endpoint_url=endpoint,
                                 output_dir=work / "outputs", temp_dir=work / "temp")
        objects = build_object_store(settings)
        assert objects is not None
        started = time.perf_counter()
        rows = await measure(args, objects, settings, work)
        report(rows, where, args.samples, time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=500,
                        help="writes, GETs and lookups per figure (default 500)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    if os.environ.get("STORAGE_URL"):  # a real store: its own credentials
        url = f"{os.environ['STORAGE_URL'].rstrip('/')}/{prefix}"
        endpoint = os.environ.get("STORAGE_ENDPOINT_URL")
        asyncio.run(run(args, url, endpoint, f"{url} at {endpoint or 'AWS'}"))
        return
    from tests.support.s3_server import CREDENTIALS, S3Server

    os.environ.update(CREDENTIALS)
    server = S3Server()
    server.start()
    try:
        location = server.location(prefix)
        asyncio.run(run(args, location.url, location.endpoint,
                        f"moto server mode (Python) on {location.endpoint}"))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
