"""A request for a training that was told to stop (its Kafka record revoked) while its next
chunk still waits behind other GPU work resumes it from its checkpoint, whether it came
before the stop or after it: it never ends with the stopping run (which would leave its
record unanswered)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from core.lora import LoraRegistry
from core.training.intake import spec_identity
from core.training.runner import TrainingInterrupted
from tests.core.test_training_service import (  # noqa: F401 (core: the fixture)
    WAIT,
    Core,
    Progress,
    core,
    recorder,
    request,
)


@pytest.mark.parametrize("second_comes", ["after the stop", "before the stop"])
async def test_a_request_for_a_stopping_training_resumes_it_from_its_checkpoint(
    core: Core, second_comes: str  # noqa: F811 (the fixture)
) -> None:
    training = core.training(lora_train_steps=100, lora_checkpoint_every=20)
    asked = request()
    loop = asyncio.get_running_loop()
    held, gate = asyncio.Event(), threading.Event()

    def hold(_pipeline: Any) -> None:  # other GPU work, which the next chunk waits behind
        loop.call_soon_threadsafe(held.set)
        gate.wait(WAIT)

    blocker: list[object] = []

    def queue_the_blocker(_step: int) -> None:  # while the first chunk runs
        if not blocker:
            blocker.append(core.worker.submit_exclusive(hold))

    first = asyncio.create_task(training.train(asked, recorder([], queue_the_blocker)))
    second: asyncio.Task[Any] | None = None
    resumed: Progress = []
    try:
        await asyncio.wait_for(held.wait(), WAIT)  # a chunk is checkpointed, the next waits
        # The tasks take their first steps in the order they were scheduled, before the
        # worker can end the run (the gate opens only after both are scheduled): "after"
        # meets a run told to stop; "before" joins it running, and then it is told to stop.
        if second_comes == "before the stop":
            second = asyncio.create_task(training.train(asked, recorder(resumed)))
        first.cancel()  # its record revoked: the run is told to stop, which it cannot yet
        if second is None:
            second = asyncio.create_task(training.train(asked, recorder(resumed)))
    finally:
        gate.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(first, WAIT)
    outcome = await asyncio.wait_for(second, WAIT)  # not TrainingInterrupted

    assert outcome.lora_id == "mia_v1" and not outcome.replayed
    info = LoraRegistry(core.settings.lora_output_dir).get(outcome.lora_id)
    resumed_from = (info.training or {})["resumed_from_step"]
    assert resumed_from >= 20 and resumed[0][0] == resumed_from + 1
    assert (await training.status(outcome.training_id)).state == "completed"  # type: ignore[union-attr]


@pytest.mark.parametrize("stopped_by", ["its record revoked", "the engine stopping"])
async def test_a_training_told_to_stop_while_its_chunk_waits_for_the_gpu_stops_at_once(
    core: Core, stopped_by: str  # noqa: F811 (the fixture)
) -> None:
    """The next chunk waits behind other GPU work (a long image); stopping the training
    drops that chunk at once, the checkpoint standing: the revoke (a rebalance) or the
    shutdown does not wait for the work ahead of it."""
    training = core.training(lora_train_steps=100, lora_checkpoint_every=20)
    loop = asyncio.get_running_loop()
    held, gate = asyncio.Event(), threading.Event()

    def hold(_pipeline: Any) -> None:
        loop.call_soon_threadsafe(held.set)
        gate.wait(WAIT)

    blocker: list[Any] = []

    def queue_the_blocker(_step: int) -> None:
        if not blocker:
            blocker.append(core.worker.submit_exclusive(hold))

    asked = request()
    run = asyncio.create_task(training.train(asked, recorder([], queue_the_blocker)))
    try:
        await asyncio.wait_for(held.wait(), WAIT)  # a chunk is checkpointed, the next waits
        if stopped_by == "its record revoked":
            run.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(run, WAIT)
        else:
            training.request_stop()
            with pytest.raises(TrainingInterrupted):
                await asyncio.wait_for(run, WAIT)
        assert not blocker[0].done()  # it ended while the other work still held the GPU
    finally:
        gate.set()
    await asyncio.wait_for(asyncio.wrap_future(blocker[0]), WAIT)
    status = await training.status(spec_identity(asked))
    assert status is not None and status.state == "queued"
    assert status.step == 20  # resumed from the checkpoint the first chunk left
