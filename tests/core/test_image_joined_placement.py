"""An image still queued on the GPU that several requests share (twins with the same
content, a redelivery) is placed for all of them, not only for the request that queued it:
its deadline is the latest of theirs (none when one has none), and it is interactive when
one of them is. A request without a deadline that joins an image queued by one with a
deadline is answered with the image, not ``EXPIRED``; an interactive one that joins a
background image lifts it ahead of other background work; and the image stays queued for
its twin when the request that queued it is cancelled. Runs the tiny development model on
the CPU; the GPU is held by an exclusive call while the requests queue.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.image import GpuWorker, build_dev_model, load_pipeline
from core.image.service import ImageResult, ImageService
from core.outputs import OutputStore
from core.scheduling import PendingRequest, PendingRequests, Priority, supervise
from schemas.errors import RequestCancelledError
from tests.core.test_image_joined_start import Gate, Joined, asked
from tests.core.test_image_requests import make_service

WAIT = 60.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_dev_model(tmp_path_factory.mktemp("model") / "flux-dev", seed=0)


@pytest.fixture
def worker(model_dir: Path) -> Iterator[GpuWorker]:
    model = load_pipeline(model_dir, device="cpu", use_fp16=False, memory_mode="none",
                          attention_backend="native", compile_transformer=False)
    gpu = GpuWorker(model, max_batch_size=4, batch_window_ms=0, lora_cache_size=2,
                    vae_tiling_threshold=1536, max_sequence_length=32)
    gpu.start()
    yield gpu
    gpu.stop(timeout=30)


@pytest.fixture
async def service(worker: GpuWorker, tmp_path: Path) -> AsyncIterator[ImageService]:
    (tmp_path / "loras").mkdir()
    async with httpx.AsyncClient() as http:
        yield make_service(worker, tmp_path / "loras", OutputStore(tmp_path / "outputs"),
                           tmp_path / "outputs" / ".results", http)


@pytest.fixture
def joins() -> Iterator[Callable[[int], Joined]]:
    """Installs a :class:`Joined` awaiting that many joins (logged at INFO)."""
    logger = logging.getLogger("core.shared_work")
    level = logger.level
    logger.setLevel(logging.INFO)
    handlers: list[Joined] = []

    def install(expected: int) -> Joined:
        handlers.append(Joined(expected))
        logger.addHandler(handlers[-1])
        return handlers[-1]

    yield install
    for handler in handlers:
        logger.removeHandler(handler)
    logger.setLevel(level)


class Held:
    """The GPU held by an exclusive call until :meth:`release`; requests started meanwhile
    run under :meth:`run` and note, in ``order``, when the GPU takes them."""

    def __init__(self, service: ImageService, worker: GpuWorker) -> None:
        self.service = service
        self.worker = worker
        self.registry = PendingRequests()
        self.order: list[str] = []
        self.tasks: list[asyncio.Task[ImageResult]] = []
        self._release = threading.Event()

    async def hold(self) -> None:
        entered = threading.Event()

        def hold(_pipeline: Any) -> None:
            entered.set()
            assert self._release.wait(WAIT)

        self.worker.submit_exclusive(hold)
        assert await asyncio.to_thread(entered.wait, WAIT)

    def release(self) -> None:
        self._release.set()

    def run(self, name: str, conversation: str, priority: Priority, *,
            deadline: float | None = None, clock: Gate | None = None,
            **fields: Any) -> tuple[PendingRequest, asyncio.Task[ImageResult]]:
        request = asked(conversation_id=conversation, **fields)
        pending = self.registry.add(request.request_id, conversation, "image", priority,
                                    deadline=deadline)

        def started() -> None:
            self.order.append(name)
            pending.mark_started()

        placement = replace(pending.placement(), on_start=started)
        work = self.service.generate(request, None, placement)
        task = asyncio.create_task(supervise(pending, work) if clock is None
                                   else supervise(pending, work, clock=clock))
        self.tasks.append(task)
        return pending, task


@pytest.fixture
async def held(service: ImageService, worker: GpuWorker) -> AsyncIterator[Held]:
    scene = Held(service, worker)
    await scene.hold()
    yield scene
    scene.release()
    for task in scene.tasks:
        task.cancel()
    await asyncio.gather(*scene.tasks, return_exceptions=True)


async def test_a_twin_without_a_deadline_keeps_the_image_it_joined_from_expiring(
    held: Held, joins: Callable[[int], Joined]
) -> None:
    joined = joins(1)
    # the first request's deadline is long past by the GPU's clock when the GPU frees up;
    # its own supervision reads a clock still before it, so only the queue judges it
    gate = Gate()
    gate.start -= 10
    _, first = held.run("first", "c", Priority.INTERACTIVE, deadline=gate.start + 1,
                        clock=gate)
    _, twin = held.run("twin", "d", Priority.INTERACTIVE)  # asks for no deadline
    await asyncio.wait_for(joined.event.wait(), WAIT)
    assert time.time() > gate.start + 1  # the queue sees the first deadline passed
    held.release()
    made, joined_twin = await asyncio.wait_for(asyncio.gather(first, twin), WAIT)
    assert joined_twin.filename == made.filename  # the image, not EXPIRED


async def test_an_interactive_twin_lifts_the_background_image_it_joined(
    held: Held, joins: Callable[[int], Joined]
) -> None:
    joined = joins(1)
    # background work of another conversation queued first, of another size (its own
    # pipeline call)
    _, other = held.run("other", "o", Priority.BACKGROUND, width=96, seed=7)
    _, first = held.run("first", "c", Priority.BACKGROUND)
    _, twin = held.run("twin", "d", Priority.INTERACTIVE)
    await asyncio.wait_for(joined.event.wait(), WAIT)
    held.release()
    await asyncio.wait_for(asyncio.gather(first, twin, other), WAIT)
    assert held.order.index("twin") < held.order.index("other")  # taken as interactive


async def test_the_image_stays_queued_for_its_twin_when_its_first_request_is_cancelled(
    held: Held, joins: Callable[[int], Joined]
) -> None:
    joined = joins(1)
    gate = Gate()  # the twin's deadline: judged by the queue once the first is gone
    first_request, first = held.run("first", "c", Priority.INTERACTIVE)
    _, twin = held.run("twin", "d", Priority.INTERACTIVE, deadline=gate.start + 3600)
    await asyncio.wait_for(joined.event.wait(), WAIT)
    first_request.cancelled.set()
    with pytest.raises(RequestCancelledError):
        await asyncio.wait_for(first, WAIT)
    held.release()
    made = await asyncio.wait_for(twin, WAIT)
    assert made.filename
    assert held.order == ["twin"]  # the first was gone before the GPU took the image
