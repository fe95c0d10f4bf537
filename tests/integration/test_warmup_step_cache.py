"""A step cache on the compiled blocks (COMPILE_TRANSFORMER=true with STEP_CACHE=taylorseer,
the cache whose hooks sit inside the blocks) on the tiny model (CPU): the warm-up compiles
every graph, then the base model, LoRAs hot-swapped in, another scale, other sizes and a
batch compile nothing (``set_stance("fail_on_recompile")``), and the base model's pixels
are the eager model's with the same cache, within float noise."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from core.image.factory import build_image_service
from core.image.warmup import compiled_graphs
from core.lora import LoraInfo
from core.metrics import EngineMetrics
from core.outputs import OutputStore
from core.settings import load_settings
from tests.integration.test_warmup import eager_worker, job, loras, pixels, same

__all__ = ["loras"]  # the fixture, shared with test_warmup

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:torch"),  # inductor's own imports
]

WAIT = 480.0  # seconds: compiling on a busy 2-core CPU; a bound, never a sleep


async def test_taylorseer_on_compiled_blocks_compiles_only_in_the_warm_up(
    tmp_path: Path, dev_model_dir: Path, loras: dict[str, LoraInfo],
) -> None:
    settings = load_settings(output_dir=tmp_path / "outputs", compile_transformer=True,
                             step_cache="taylorseer", step_cache_interval=2,
                             max_batch_size=2, _env_file=None)
    async with httpx.AsyncClient() as http:
        _, worker = await asyncio.wait_for(build_image_service(
            settings, dev_model_dir, OutputStore(settings.output_dir), http,
            EngineMetrics(CollectorRegistry())), WAIT)
    try:
        assert worker.model.compiled and worker.model.step_cache is not None
        graphs = compiled_graphs()
        sarah, emma = loras["sarah"], loras["emma"]
        four = {"steps": 4}  # interval 2: predicted steps between computed ones
        with torch.compiler.set_stance("fail_on_recompile"):
            (base,) = await pixels(worker, dataclasses.replace(job(), **four))
            (first,) = await pixels(worker, dataclasses.replace(job(lora=sarah), **four))
            assert same(await pixels(worker, dataclasses.replace(job(), **four)), base)
            await pixels(worker, dataclasses.replace(job(lora=sarah), lora_scale=0.5, **four))
            await pixels(worker, dataclasses.replace(job((384, 256), lora=emma), **four))
            await pixels(worker, job((320, 192), count=2))
            assert same(await pixels(worker, dataclasses.replace(job(lora=sarah), **four)),
                        first)
        assert compiled_graphs() == graphs
        assert np.abs(first - base).mean() > 1.0
        eager = await eager_worker(settings, dev_model_dir)
        try:
            (eager_base,) = await pixels(eager, dataclasses.replace(job(), **four))
        finally:
            await asyncio.to_thread(eager.stop)
        assert np.abs(base - eager_base).max() <= 2.0
    finally:
        await asyncio.to_thread(worker.stop)
