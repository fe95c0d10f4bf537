"""Finding the LoRA a training registered in the shared store reads its registration once
(the registration that names the training back is the one fetched), and an index naming an
id the registry would refuse is no LoRA. A real S3-protocol server behind a recording
proxy (:class:`~tests.support.faulty_store.FaultyStore`, here failing nothing)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from core.lora import LoraRegistry
from core.lora.shared import SharedLoras
from core.settings import load_settings
from core.storage import ObjectStore, build_object_store
from tests.core.test_lora_registry import fake_lora
from tests.support.faulty_store import FaultyStore
from tests.support.s3_server import StoreLocation


def objects_at(location: StoreLocation, endpoint: str) -> ObjectStore:
    objects = build_object_store(load_settings(storage_url=location.url,
                                               storage_endpoint_url=endpoint))
    assert objects is not None
    return objects


@pytest.fixture
async def proxy(s3_store: StoreLocation) -> AsyncIterator[tuple[FaultyStore, str]]:
    store = FaultyStore(s3_store.endpoint)
    endpoint = await store.start()
    yield store, endpoint
    await store.stop()


def gets(store: FaultyStore, tail: str) -> int:
    return sum(1 for seen in store.seen if seen.method == "GET" and seen.path.endswith(tail))


async def test_the_lora_a_training_registered_is_found_with_one_read_of_its_registration(
        s3_store: StoreLocation, proxy: tuple[FaultyStore, str], tmp_path: Path) -> None:
    store, endpoint = proxy
    first = LoraRegistry(tmp_path / "a", shared=SharedLoras(objects_at(s3_store,
                                                                       s3_store.endpoint)))
    source = fake_lora(tmp_path / "trained.safetensors")
    await asyncio.to_thread(first.register, "zoe_v1", source, trigger_word="zoexyz",
                            base_model=None, training={"training_id": "t-1"})
    other = LoraRegistry(tmp_path / "b", shared=SharedLoras(objects_at(s3_store, endpoint)))

    found = await asyncio.to_thread(other.made_by, "t-1")

    assert found is not None and (found.lora_id, found.trigger_word) == ("zoe_v1", "zoexyz")
    assert found.path.read_bytes() == source.read_bytes()  # fetched onto b's disk
    assert gets(store, "/loras/zoe_v1.json") == 1


async def test_an_index_naming_an_id_the_registry_refuses_names_no_lora(
        s3_store: StoreLocation, proxy: tuple[FaultyStore, str]) -> None:
    store, endpoint = proxy
    objects = objects_at(s3_store, endpoint)  # blocking calls: in threads (the proxy is ours)
    # a registration that names the training back, under an id with a leading dot
    await asyncio.to_thread(objects.put_bytes, "loras/trainings/t-2.json",
                            json.dumps({"lora_id": ".zoe"}).encode())
    await asyncio.to_thread(objects.put_bytes, "loras/.zoe.json", json.dumps(
        {"sha256": "0" * 64, "training": {"training_id": "t-2"}}).encode())

    assert await asyncio.to_thread(SharedLoras(objects).made_by, "t-2") is None
    assert gets(store, "/loras/.zoe.json") == 0  # refused before it is asked for
