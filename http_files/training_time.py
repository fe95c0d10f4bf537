"""The work time of a ``POST /train-lora``, measured as a Kafka training's.

``engine_processing_seconds{kind="lora"}`` runs from the start of the work (the request
handed to the training service: images checked, inputs written) to its result (the LoRA
registered, or the training failed), as :mod:`consumers.answering` measures a
``generation.requested.lora``. The HTTP answer comes when the training starts, so its end is
awaited in the background (:meth:`TrainingService.wait`). A training stopped by the engine
stopping (it resumes later) is no measurement, as on the Kafka path; a request refused
before any training started (a 422 from the images) is one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path

from core.metrics import EngineMetrics
from core.training import TrainingService, TrainingStatus
from schemas.errors import EngineError
from schemas.events import LoraTrainingRequested

__all__ = ["submit_timed"]

_ENDED = ("completed", "failed")

# the background waits, held here: the event loop keeps only weak references to tasks
_waiting: set[asyncio.Task[None]] = set()


async def submit_timed(metrics: EngineMetrics, training: TrainingService,
                       request: LoraTrainingRequested, files: Sequence[Path]
                       ) -> TrainingStatus:
    """:meth:`TrainingService.submit` (same result, same errors), its work time observed
    now when it ended already (found registered, or refused) and else when the training
    ends."""
    started = time.monotonic()
    try:
        status = await training.submit(request, files=files)
    except EngineError:
        _observe(metrics, started)
        raise
    if status.state in _ENDED:
        _observe(metrics, started)
    else:
        waiting = asyncio.create_task(_observe_end(metrics, training, status.training_id,
                                                   started),
                                      name=f"training-time-{status.training_id}")
        _waiting.add(waiting)
        waiting.add_done_callback(_waiting.discard)
    return status


async def _observe_end(metrics: EngineMetrics, training: TrainingService, training_id: str,
                       started: float) -> None:
    status = await training.wait(training_id)  # its errors are in the status
    if status is not None and status.state in _ENDED:
        _observe(metrics, started)


def _observe(metrics: EngineMetrics, started: float) -> None:
    metrics.processing.labels("lora").observe(time.monotonic() - started)
