"""The images an instance makes before it says it is ready.

:func:`warm_up` runs them through the GPU worker once the model is loaded
(:func:`core.image.factory.build_image_service`, while readiness says ``warming``):

- Always: one image without a LoRA at the size requests get by default, one step. It
  proves the model runs here at all (attention backend, fp8 kernels, memory at that size)
  before the instance takes requests, and the first request does not pay the device's
  start-up (CUDA context, kernel libraries). About a second on a CPU with the tiny model.
- With a compiled transformer (COMPILE_TRANSFORMER=true), every graph serving needs: that
  first image compiles the blocks for a batch of one image; one with a LoRA in the
  hotswap slot, which must compile nothing (a random LoRA of the slot's rank made here, in
  a temporary file, never registered); then, when MAX_BATCH_SIZE > 1, a batch of two
  images without a LoRA, which compiles the blocks for batches (torch specialises a batch
  of one). The worker is back on the base model at the end. Shapes are dynamic
  (:func:`core.image.loader.prepare_model`), so other sizes, step counts, batch sizes above
  one, LoRAs, the way back to the base model, negative prompts and image-to-image compile
  nothing more.

The graphs compiled are counted with torch's own counter
(``torch._dynamo.utils.counters["stats"]["unique_graphs"]``) and logged with the
durations; a LoRA image that compiled anything is a warning (hotswap recompiles).
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from core.image.job import ImageJob
from core.image.loader import HOTSWAP_RANK
from core.image.worker import GpuWorker
from core.lora.registry import LoraInfo, file_sha256

__all__ = ["WarmUp", "WarmedImage", "compiled_graphs", "warm_up"]

logger = logging.getLogger(__name__)

_PROMPT = "a lighthouse on a cliff at dusk"
_WARM_UP_LORA = "(warm-up)"  # not a valid id: no registered LoRA can share it
_LORA_TARGETS = ("to_k", "to_out.0", "to_q", "to_v")  # the hotswap slot's


@dataclass(frozen=True)
class WarmedImage:
    """One warm-up call: what it was, how long it took in all (compilation included),
    and how many graphs torch compiled meanwhile."""

    label: str
    seconds: float
    graphs: int


@dataclass(frozen=True)
class WarmUp:
    """What :func:`warm_up` did."""

    images: tuple[WarmedImage, ...]
    seconds: float

    @property
    def graphs(self) -> int:
        """Graphs compiled during the whole warm-up."""
        return sum(image.graphs for image in self.images)


def compiled_graphs() -> int:
    """Graphs torch.compile has made in this process so far (every compilation and
    recompilation adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


async def warm_up(worker: GpuWorker, *, size: int, max_batch_size: int,
                  guidance: float = 3.5) -> WarmUp:
    """Make the warm-up images (see the module's docstring) at ``size`` × ``size`` on
    ``worker``, started and serving no one yet. Their images are dropped, and metrics do not
    count them (:meth:`GpuWorker.warm_up`). Raises what the worker raises for a failed
    image (an :class:`~schemas.errors.EngineError`)."""
    started = time.perf_counter()
    images = [await _timed(worker, "base model", _job(size, guidance))]
    if worker.model.hotswap_slot is not None:
        with tempfile.TemporaryDirectory(prefix="warm-up-lora-") as directory:
            lora = await _random_lora(worker, Path(directory) / "warm-up.safetensors")
            images.append(await _timed(worker, "LoRA in the hotswap slot",
                                       _job(size, guidance, lora=lora)))
        if images[-1].graphs:
            logger.warning("warm-up: hot-swapping a LoRA in compiled %d graph(s); each new "
                           "LoRA may recompile", images[-1].graphs)
        if max_batch_size > 1:
            images.append(await _timed(worker, "base model, batch of 2",
                                       _job(size, guidance, count=2)))
    done = WarmUp(tuple(images), time.perf_counter() - started)
    logger.info("warm-up: %d image(s) at %dx%d in %.1f s, %d graph(s) compiled (%s)",
                len(done.images), size, size, done.seconds, done.graphs,
                "; ".join(f"{image.label} {image.seconds:.1f} s, {image.graphs} graph(s)"
                          for image in done.images))
    return done


def _job(size: int, guidance: float, *, lora: LoraInfo | None = None,
         count: int = 1) -> ImageJob:
    return ImageJob(prompt=_PROMPT, negative_prompt=None, width=size, height=size, steps=1,
                    guidance=guidance, true_cfg_scale=1.0, seed=0, lora=lora, count=count)


async def _timed(worker: GpuWorker, label: str, job: ImageJob) -> WarmedImage:
    graphs = compiled_graphs()
    started = time.perf_counter()
    await worker.warm_up(job)
    return WarmedImage(label, time.perf_counter() - started, compiled_graphs() - graphs)


async def _random_lora(worker: GpuWorker, path: Path) -> LoraInfo:
    """A random LoRA shaped like the hotswap slot (its rank, its layers), written to
    ``path`` in the worker's thread (the pipeline is that thread's)."""
    slot = worker.model.hotswap_slot
    assert slot is not None
    await worker.run_exclusive(lambda pipeline: _write_slot_shaped_lora(pipeline, slot, path))
    digest = await asyncio.to_thread(file_sha256, path)
    return LoraInfo(lora_id=_WARM_UP_LORA, path=path, trigger_word=None, rank=HOTSWAP_RANK,
                    alpha=float(HOTSWAP_RANK), targets=_LORA_TARGETS, base_model=None,
                    sha256=digest, created_at=datetime.now(UTC).isoformat())


def _write_slot_shaped_lora(pipeline: Any, slot: str, path: Path) -> None:
    import torch
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    state: dict[str, torch.Tensor] = {}
    for name, module in pipeline.transformer.named_modules():
        if not (isinstance(module, LoraLayer) and slot in module.lora_A):
            continue
        for part in ("lora_A", "lora_B"):
            weight = getattr(module, part)[slot].weight
            # small: the image is dropped, but it should stay an image
            state[f"transformer.{name}.{part}.weight"] = (
                torch.randn(weight.shape, generator=generator) * 0.01).to(weight.dtype)
    if not state:
        raise RuntimeError(f"no layer holds the hotswap slot {slot!r}")
    save_file(state, str(path))
