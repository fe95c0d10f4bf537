"""``python -m tests.support.warm_instance MODEL OUTPUT_DIR``: one instance's image core, built
as ``serve`` builds it (COMPILE_TRANSFORMER=true, the warm-up, the shared store from
STORAGE_URL in the environment), in a process of its own: torch's in-memory and on-disk
compile caches are the process's (TORCHINDUCTOR_CACHE_DIR), as on a new pod.

Prints one JSON line: the warm-up's kernel-cache ``hits`` and ``misses`` and the sha256 of
one image's pixels, then stops the worker."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import sys
from pathlib import Path

import httpx
from prometheus_client import CollectorRegistry

from core.image import ImageJob
from core.image.compile_cache import kernel_cache_counts
from core.image.factory import build_image_service
from core.metrics import EngineMetrics
from core.outputs import OutputStore
from core.settings import load_settings
from core.storage import build_object_store


async def main(model: Path, output_dir: Path) -> None:
    settings = load_settings(output_dir=output_dir, compile_transformer=True, max_batch_size=1,
                             max_image_size=256, _env_file=None)
    before = kernel_cache_counts()
    async with httpx.AsyncClient() as http:
        _, worker = await build_image_service(
            settings, model, OutputStore(output_dir), http, EngineMetrics(CollectorRegistry()),
            objects=build_object_store(settings))
    after = kernel_cache_counts()
    try:
        image = await worker.generate(ImageJob(
            prompt="a lighthouse", negative_prompt=None, width=96, height=96, steps=2,
            guidance=3.5, true_cfg_scale=1.0, seed=7, lora=None))
    finally:
        await asyncio.to_thread(worker.stop)
    print(json.dumps({"hits": after[0] - before[0], "misses": after[1] - before[1],
                      "pixels": hashlib.sha256(image.tobytes()).hexdigest()}))


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("core.image").setLevel(logging.INFO)  # the compile cache's lines
    asyncio.run(main(Path(sys.argv[1]), Path(sys.argv[2])))
