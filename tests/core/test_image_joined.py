"""Requests that join an image still queued on the GPU (twins with the same content, a
redelivery): the image is placed for all of them, and each starts when it starts.

A twin that joins starts when the image starts: it stops counting as waiting
(``engine_queue_depth_requests``), its queue wait is observed, and its deadline no longer
applies, so it is answered with the image rather than ``EXPIRED``. The queued image's
deadline is the latest of its requests' (none when one has none), and it is interactive
when one of them is: a twin without a deadline that joins an image queued by one with a
deadline gets the image, an interactive one lifts a background image ahead of other
background work, and the image stays queued for its twin when the request that queued it
is cancelled. Runs the tiny development model on the CPU; the GPU is held by an exclusive
call while the requests queue.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.image import GpuWorker, build_dev_model, load_pipeline
from core.image.service import ImageResult, ImageService
from core.outputs import OutputStore
from core.scheduling import PendingRequest, PendingRequests, Priority, supervise
from core.shared_work import SharedWork
from schemas.errors import RequestCancelledError
from schemas.events import ImageRequested
from tests.core.test_image_requests import make_service

WAIT = 60.0
STEPS = 30  # long enough that the image still runs when the twin's deadline is judged


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


def asked(**fields: Any) -> ImageRequested:
    return ImageRequested.model_validate({
        "request_id": str(uuid.uuid4()), "conversation_id": "c", "prompt": "a park",
        "width": 64, "height": 64, "num_inference_steps": STEPS, "optimize_prompt": False,
        "seed": 5, **fields})


class Joined(logging.Handler):
    """Sets ``event`` once ``expected`` requests joined work being made (each join is
    logged as it happens, on the event loop, just before the caller attaches)."""

    def __init__(self, expected: int = 1) -> None:
        super().__init__()
        self.left = expected
        self.event = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "joins the same image" in record.getMessage():
            self.left -= 1
            if self.left <= 0:
                self.event.set()


@pytest.fixture
def joins() -> Iterator[Callable[[int], Joined]]:
    """Installs a :class:`Joined` awaiting that many joins."""
    logger = logging.getLogger("core.shared_work")
    level = logger.level
    logger.setLevel(logging.INFO)  # the join is logged at INFO
    handlers: list[Joined] = []

    def install(expected: int) -> Joined:
        handlers.append(Joined(expected))
        logger.addHandler(handlers[-1])
        return handlers[-1]

    yield install
    for handler in handlers:
        logger.removeHandler(handler)
    logger.setLevel(level)
    

class Gate:
    """A wall clock for the twin's deadline: still ``start`` until opened, then far past
    any deadline (so the deadline is judged exactly when the test says)."""

    def __init__(self) -> None:
        self.start = time.time()
        self.open = False

    def __call__(self) -> float:
        return self.start + 3600 if self.open else self.start


@dataclass
class Scene:
    registry: PendingRequests
    waits: list[float]
    first: PendingRequest
    twin: PendingRequest
    first_task: asyncio.Task[ImageResult]
    twin_task: asyncio.Task[ImageResult]
    running: asyncio.Event  # the image's first step was published
    release: threading.Event  # lets the GPU go to the image


@pytest.fixture
async def joined_while_queued(service: ImageService, worker: GpuWorker,
                              joins: Callable[[int], Joined]
                              ) -> AsyncIterator[Callable[[Gate | None], Any]]:
    """Builds the scene: the GPU held, a first request queued, its twin (with a deadline
    judged by ``gate`` when given) joined to it; the GPU still held."""
    handler = joins(1)
    release = threading.Event()
    tasks: list[asyncio.Task[ImageResult]] = []

    async def build(gate: Gate | None) -> Scene:
        entered = threading.Event()

        def hold(_pipeline: Any) -> None:
            entered.set()
            assert release.wait(WAIT)

        worker.submit_exclusive(hold)
        assert await asyncio.to_thread(entered.wait, WAIT)
        waits: list[float] = []
        registry = PendingRequests(on_queue_wait=lambda _kind, _p, seconds: waits.append(
            seconds))
        running = asyncio.Event()

        async def first_step(step: int, total: int) -> None:
            running.set()

        one, two = asked(), asked()
        first = registry.add(one.request_id, "c", "image", Priority.INTERACTIVE)
        twin = registry.add(two.request_id, "d", "image", Priority.INTERACTIVE,
                            deadline=None if gate is None else gate.start + 0.01)
        first_task = asyncio.create_task(supervise(
            first, service.generate(one, first_step, first.placement())))
        tasks.append(first_task)
        twin_work = service.generate(two, None, twin.placement())
        twin_task = asyncio.create_task(
            supervise(twin, twin_work) if gate is None else supervise(twin, twin_work,
                                                                      clock=gate))
        tasks.append(twin_task)
        await asyncio.wait_for(handler.event.wait(), WAIT)
        return Scene(registry, waits, first, twin, first_task, twin_task, running, release)

    yield build
    release.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_twin_joined_while_queued_starts_with_the_image(
    joined_while_queued: Callable[[Gate | None], Any]
) -> None:
    scene: Scene = await joined_while_queued(None)
    assert scene.registry.depths()["image"]["interactive"] == 2  # both wait for the GPU
    assert not scene.twin.started
    scene.release.set()
    await asyncio.wait_for(scene.running.wait(), WAIT)
    assert scene.first.started and scene.twin.started  # taken by the GPU together
    assert scene.registry.depths()["image"]["interactive"] == 0  # neither waits any more
    assert len(scene.waits) == 2  # a queue wait observed for each
    made, twin = await asyncio.wait_for(
        asyncio.gather(scene.first_task, scene.twin_task), WAIT)
    assert twin.filename == made.filename


async def test_a_twin_joined_while_queued_is_not_expired_once_the_image_runs(
    joined_while_queued: Callable[[Gate | None], Any]
) -> None:
    gate = Gate()
    scene: Scene = await joined_while_queued(gate)
    scene.release.set()
    await asyncio.wait_for(scene.running.wait(), WAIT)
    gate.open = True  # the twin's deadline passes while the image it joined runs
    made, twin = await asyncio.wait_for(
        asyncio.gather(scene.first_task, scene.twin_task), WAIT)
    assert twin.filename == made.filename  # answered with the image, not EXPIRED


# --- the start as shared work tells it (core/shared_work.py) ---

async def test_shared_work_tells_its_start_to_callers_attached_and_joining_only(
    joins: Callable[[int], Joined]
) -> None:
    work: SharedWork[str] = SharedWork("image")
    told: list[str] = []
    queued, release, late_told = asyncio.Event(), asyncio.Event(), asyncio.Event()
    signal: list[Callable[[], None]] = []

    async def make() -> str:
        signal.append(work.start_signal("k"))
        queued.set()
        await release.wait()
        return "made"

    first = asyncio.create_task(work.run("k", make, on_start=lambda: told.append("first")))
    await asyncio.wait_for(queued.wait(), WAIT)
    both = joins(2)
    gone = asyncio.create_task(work.run("k", make, on_start=lambda: told.append("gone")))
    twin = asyncio.create_task(work.run("k", make, on_start=lambda: told.append("twin")))
    await asyncio.wait_for(both.event.wait(), WAIT)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert told == []  # not started yet
    await asyncio.to_thread(signal[0])  # reported from another thread, as the GPU does
    signal[0]()  # once only
    assert sorted(told) == ["first", "twin"]  # the caller gone before is not told
    late = asyncio.create_task(work.run("k", make, on_start=late_told.set))
    await asyncio.wait_for(late_told.wait(), WAIT)  # joined started work: told at once
    release.set()
    assert await asyncio.gather(first, twin, late) == ["made"] * 3
    assert sorted(told) == ["first", "twin"]


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
