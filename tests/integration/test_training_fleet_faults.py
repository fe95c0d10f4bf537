"""LoRA training in a fleet when the shared store fails on cue or an instance dies: one
training is registered once whatever write fails, trained once when the same POST reaches
two instances at once, reported abandoned (and taken over by a retried POST) once its
instance stops renewing its status, resumed at once by its own instance's restart, and
never started over when reading its checkpoint back fails. The store is moto's S3 server behind :class:`FaultyStore` (503 SlowDown on
the requests each test picks)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from prometheus_client import CollectorRegistry

from consumers.engine import Engine
from consumers.serve import prepare_dev_model
from core.lora import LoraRegistry
from core.lora.shared import SharedLoras
from core.settings import Settings, load_settings
from core.storage import ObjectStore, build_object_store
from core.training.adapter import LORA_RANK
from core.training.checkpoint import TrainingFolder
from core.training.register import find_registered, register_lora
from core.training.service import STATUS_LEASE_SECONDS
from core.training.shared import SharedTrainings
from core.training.spec import TrainingSpec, training_id_for
from tests.core.test_training_images import photos
from tests.integration.test_fleet import _TRAINING
from tests.integration.test_lora_training import lora_request
from tests.support.faulty_store import FaultyStore, Seen
from tests.support.kafka_client import PersonaPeer
from tests.support.s3_server import StoreLocation

StartEngine = Callable[[str, str], Awaitable[Engine]]


def objects_at(location: StoreLocation, endpoint: str | None = None) -> ObjectStore:
    objects = build_object_store(load_settings(
        storage_url=location.url, storage_endpoint_url=endpoint or location.endpoint))
    assert objects is not None
    return objects


@pytest.fixture
async def faulty(s3_store: StoreLocation) -> AsyncIterator[Callable[[], Awaitable[
        tuple[FaultyStore, str]]]]:
    """Makes fault proxies in front of the test's store: (proxy, its endpoint)."""
    made: list[FaultyStore] = []

    async def make() -> tuple[FaultyStore, str]:
        made.append(store := FaultyStore(s3_store.endpoint))
        return store, await store.start()

    yield make
    for store in made:
        await store.stop()


def put_to(tail: str) -> Callable[[str, str], bool]:
    return lambda method, path: method == "PUT" and tail in path


# ------------------------------------------------------------------ registering once

_FAULTS: dict[str, Callable[[FaultyStore], object]] = {
    # the index's write fails (the registration, after it, is never tried)
    "index refused": lambda store: store.refuse(put_to("/loras/trainings/")),
    # the index landed, the registration did not: also what a SIGKILL between them leaves
    "registration refused": lambda store: store.refuse(put_to("/loras/mia_v1.json")),
    # the registration landed, its answer was lost: the engine saw a store error
    "registration landed, answer lost": lambda store: store.lose(put_to("/loras/mia_v1.json")),
}


def _register(registry: LoraRegistry, folder: Path) -> str:
    spec = TrainingSpec(training_id="mia_0badc0de", request_id="r-1", conversation_id=None,
                        character_id="mia", trigger_word="miaxyz", caption="a photo of miaxyz",
                        steps=1, learning_rate=1e-4, resolution=64, batch_size=1,
                        origin="kafka")
    generator = torch.Generator().manual_seed(0)
    weights = {f"transformer_blocks.0.attn.{m}.lora_{ab}.weight":
               torch.randn(shape, generator=generator)
               for m in ("to_q", "to_k") for ab, shape in (("A", (LORA_RANK, 8)),
                                                          ("B", (8, LORA_RANK)))}
    return register_lora(registry, TrainingFolder(folder), spec, weights, dtype=torch.float32,
                         base_model="dev", training={"training_id": spec.training_id}).lora_id


@pytest.mark.parametrize("fault", list(_FAULTS))
async def test_a_registration_retried_after_a_store_error_registers_the_training_once(
    fault: str, s3_store: StoreLocation, faulty: Any, tmp_path: Path,
) -> None:
    store, endpoint = await faulty()
    registry = LoraRegistry(tmp_path / "a", shared=SharedLoras(objects_at(s3_store, endpoint)))
    _FAULTS[fault](store)
    with pytest.raises(OSError):  # UPSTREAM_UNAVAILABLE for the request: retried
        await asyncio.to_thread(_register, registry, tmp_path / "t")
    assert await asyncio.to_thread(_register, registry, tmp_path / "t") == "mia_v1"  # retry
    other = LoraRegistry(tmp_path / "b", shared=SharedLoras(objects_at(s3_store)))
    assert await asyncio.to_thread(other.versions, "mia") == [1]  # one training, one LoRA
    found = await asyncio.to_thread(find_registered, other, "mia_0badc0de")
    assert found is not None and found.lora_id == "mia_v1"  # found from anywhere


# ------------------------------------------------------------------ HTTP trainings

def form(request_id: str, steps: int) -> dict[str, Any]:
    return {"files": [("images", (f"{n}.png", data, "image/png"))
                      for n, data in enumerate(photos(5))],
            "data": {"character_id": "mia", "trigger_word": "zqx", "request_id": request_id,
                     "steps": str(steps)}}


async def post(engine: Engine, request_id: str, steps: int) -> httpx.Response:
    assert engine.addresses is not None
    async with httpx.AsyncClient(base_url=engine.addresses.http_url, timeout=60) as client:
        return await client.post("/train-lora", **form(request_id, steps))


async def status_on(engine: Engine, training_id: str) -> dict[str, Any]:
    assert engine.addresses is not None
    async with httpx.AsyncClient(base_url=engine.addresses.http_url) as client:
        response = await client.get(f"/train-lora/{training_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def taken_in(folder: Path, training_id: str) -> bool:
    """Whether an instance whose folders are under ``folder`` took the training in."""
    return (folder / "temp" / "training" / training_id / "spec.json").exists()


@pytest.fixture
async def start_engine(settings: Settings, dev_model_dir: Path, tmp_path: Path,
                       s3_store: StoreLocation) -> AsyncIterator[StartEngine]:
    """Starts an instance with folders of its own under ``tmp_path/name`` whose store is
    reached at ``endpoint`` (a fault proxy's)."""
    engines: list[Engine] = []

    async def start(name: str, endpoint: str) -> Engine:
        own = tmp_path / name
        configured = settings.model_copy(update={
            "dev_model_dir": dev_model_dir, "output_dir": own / "outputs",
            "lora_output_dir": own / "loras", "temp_dir": own / "temp",
            "storage_url": s3_store.url, "storage_endpoint_url": endpoint,
            "batch_window_ms": 0, **_TRAINING})
        model_path = await asyncio.to_thread(prepare_dev_model, configured)
        assert configured.kafka_bootstrap_servers is not None
        engines.append(engine := Engine(configured, configured.kafka_bootstrap_servers,
                                        model_path=model_path, http_host="127.0.0.1",
                                        registry=CollectorRegistry()))
        await engine.start()
        return engine

    yield start
    for engine in engines:
        await engine.stop()


@pytest.mark.kafka
async def test_the_same_post_reaching_two_instances_at_once_is_trained_once(
    start_engine: StartEngine, s3_store: StoreLocation, tmp_path: Path,
) -> None:
    engines = [await start_engine(name, s3_store.endpoint) for name in ("a", "b")]
    request_id = str(uuid.uuid4())  # a client's retry, or a load balancer's, mid-upload
    answers = await asyncio.gather(*(post(e, request_id, 400) for e in engines))
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    bodies = [a.json() for a in answers]
    assert [b["status"] for b in bodies] == ["training_started"] * 2
    training_id = bodies[0]["training_id"]
    assert bodies[1]["training_id"] == training_id
    # one instance took the photos in and trains; the other answered its status
    assert sum(taken_in(tmp_path / name, training_id) for name in ("a", "b")) == 1
    seen = [await status_on(e, training_id) for e in engines]
    assert {s["state"] for s in seen} <= {"queued", "training"}, seen


def age_status(objects: ObjectStore, training_id: str, seconds: float) -> None:
    """Makes the stored status ``seconds`` old: what it is once that long has passed with
    no word from its owner (the lease is minutes; the test does not wait them out)."""
    key = f"trainings/{training_id}/status.json"
    document = json.loads(objects.get_bytes(key) or b"{}")
    then = datetime.now(UTC) - timedelta(seconds=seconds)
    document["status"]["updated_at"] = then.isoformat(timespec="milliseconds")
    objects.put_bytes(key, json.dumps(document).encode())


@pytest.mark.kafka
async def test_an_http_training_whose_instance_died_is_taken_over_by_a_retried_post(
    start_engine: StartEngine, faulty: Any, s3_store: StoreLocation, tmp_path: Path,
) -> None:
    (dying_store, dying_endpoint), (store, endpoint) = await faulty(), await faulty()
    dying = await start_engine("dying", dying_endpoint)
    survivor = await start_engine("survivor", endpoint)
    request_id = str(uuid.uuid4())
    first = await post(dying, request_id, 60)
    assert first.status_code == 200, first.text
    training_id = first.json()["training_id"]

    def marker(seen: Seen) -> bool:  # a checkpoint in the store (step 20)
        return seen.method == "PUT" and seen.status == 200 and seen.path.endswith(
            f"/trainings/{training_id}/checkpoint.json")

    await dying_store.wait_for(marker)
    dying_store.down = True  # it dies: nothing of it reaches the store from now on
    await dying.stop()
    objects = objects_at(s3_store)
    checkpoint = SharedTrainings(objects).checkpoint_step(training_id)
    assert checkpoint is not None and checkpoint >= 20

    # within the lease nobody can tell it from a live one: a retry starts nothing
    assert (await status_on(survivor, training_id))["state"] in ("queued", "training")
    again = await post(survivor, request_id, 60)
    assert again.status_code == 200 and again.json()["status"] == "training_started"
    assert not taken_in(tmp_path / "survivor", training_id)

    # the lease runs out with no word from it: abandoned, and a retry may take it over
    await asyncio.to_thread(age_status, objects, training_id, STATUS_LEASE_SECONDS + 1)
    seen = await status_on(survivor, training_id)
    assert (seen["state"], seen["error_code"], seen["retryable"]) == (
        "failed", "TIMEOUT", True), seen

    # a store error while restoring it: retryable, and the checkpoint stays in the store
    store.refuse(lambda method, path: method == "GET" and "/checkpoints/" in path)
    blip = await post(survivor, request_id, 60)
    assert blip.status_code == 503, blip.text
    assert (blip.json()["error_code"], blip.json()["retryable"]) == (
        "UPSTREAM_UNAVAILABLE", True)
    assert SharedTrainings(objects).checkpoint_step(training_id) == checkpoint
    seen = await status_on(survivor, training_id)
    assert (seen["state"], seen["retryable"]) == ("failed", True), seen

    # retried again: resumed from the dead one's checkpoint, finished, registered once
    taken = await post(survivor, request_id, 60)
    assert taken.status_code == 200 and taken.json()["status"] == "training_started"
    assert survivor.training is not None
    done = await survivor.training.wait(training_id)
    assert done is not None and done.state == "completed" and done.lora_id == "mia_v1", done
    reader = LoraRegistry(tmp_path / "reader", shared=SharedLoras(objects))
    info = await asyncio.to_thread(find_registered, reader, training_id)
    assert info is not None and info.training is not None
    assert info.training["resumed_from_step"] == checkpoint
    assert await asyncio.to_thread(reader.versions, "mia") == [1]


@pytest.mark.kafka
async def test_an_instance_restarted_on_its_own_disk_resumes_its_http_training_at_once(
    start_engine: StartEngine, faulty: Any, s3_store: StoreLocation, tmp_path: Path,
) -> None:
    store, endpoint = await faulty()
    engine = await start_engine("one", endpoint)
    answer = await post(engine, str(uuid.uuid4()), 60)
    assert answer.status_code == 200, answer.text
    training_id = answer.json()["training_id"]
    await store.wait_for(lambda seen: seen.method == "PUT" and seen.status == 200 and
                         seen.path.endswith(f"/trainings/{training_id}/checkpoint.json"))
    await engine.stop()  # a restart: its status in the store is fresh, and its own
    restarted = await start_engine("one", endpoint)  # same host, same disk
    assert restarted.training is not None
    done = await restarted.training.wait(training_id)  # resumed at start-up
    assert done is not None and done.state == "completed", done
    reader = LoraRegistry(tmp_path / "reader", shared=SharedLoras(objects_at(s3_store)))
    info = await asyncio.to_thread(find_registered, reader, training_id)
    assert info is not None and info.training is not None
    assert info.training["resumed_from_step"] >= 20


# ------------------------------------------------------------------ Kafka trainings

@pytest.mark.kafka
async def test_a_store_error_while_restoring_a_moved_training_is_retried_not_restarted(
    start_engine: StartEngine, faulty: Any, peer: PersonaPeer, s3_store: StoreLocation,
) -> None:
    first = await start_engine("first", s3_store.endpoint)
    training = lora_request(steps=60)
    rid = training["request_id"]
    await peer.publish("lora", training, key="mia")
    await peer.wait_for(lambda a: a.kind == "progress" and a.event["request_id"] == rid
                        and a.event["step"] > 20, timeout=60)  # checkpoint 20 is stored
    await first.stop()  # rescheduled: checkpointed, its record left uncommitted
    checkpoint = SharedTrainings(objects_at(s3_store)).checkpoint_step(
        training_id_for("mia", rid))
    assert checkpoint is not None and checkpoint >= 20
    stopped = time.perf_counter()  # the peer's clock: nothing of the first one after

    store, endpoint = await faulty()
    store.refuse(lambda method, path: method == "GET" and "/checkpoints/" in path)
    await start_engine("second", endpoint)
    resumed = await peer.wait_for(lambda a: a.kind == "progress" and a.event[
        "request_id"] == rid and a.received_at > stopped, timeout=60)
    assert resumed[0].event["step"] == checkpoint + 1  # resumed, not started over
    done = (await peer.answers_for([rid], timeout=60))[rid]
    assert done.kind == "completed" and done.event["lora_id"] == "mia_v1", done.event
    assert sum(1 for s in store.seen if s.status == 503) == 4  # the blip did happen
