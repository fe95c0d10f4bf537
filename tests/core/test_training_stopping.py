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
