"""The LoRA registry of a fleet, on a real S3-protocol server: a LoRA registered by one
instance is usable on every other at once, registration is decided by the store (two
trainings of one character finishing together get two versions), and no reader ever finds
a LoRA without its metadata."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from core.lora import LoraRegistry
from core.lora.shared import SharedLoras
from core.settings import load_settings
from core.storage import build_object_store
from core.training.adapter import LORA_ALPHA, LORA_RANK
from core.training.checkpoint import TrainingFolder
from core.training.register import find_registered, register_lora
from core.training.spec import TrainingSpec
from schemas.errors import UnknownLoraError
from tests.core.test_lora_registry import fake_lora
from tests.support.s3_server import StoreLocation


def instance(location: StoreLocation, folder: Path) -> LoraRegistry:
    objects = build_object_store(load_settings(storage_url=location.url,
                                               storage_endpoint_url=location.endpoint))
    assert objects is not None
    return LoraRegistry(folder, shared=SharedLoras(objects))


def test_a_lora_registered_on_one_instance_is_usable_on_another(
        s3_store: StoreLocation, tmp_path: Path) -> None:
    first, other = instance(s3_store, tmp_path / "a"), instance(s3_store, tmp_path / "b")
    source = fake_lora(tmp_path / "trained.safetensors", rank=4, alpha=8)
    made = first.register("zoe_v1", source, trigger_word="zoexyz", base_model="flux-dev",
                          training={"training_id": "t-1"})
    with pytest.raises(UnknownLoraError):  # get never asks the store (the event loop's)
        other.get("zoe_v1")
    other.fetch(["zoe_v1", "zoe_v9", "../x"])  # what image requests do first, in a thread
    found = other.get("zoe_v1")  # nothing was on b's disk: fetched from the store
    assert (found.sha256, found.trigger_word, found.rank) == (made.sha256, "zoexyz", 4)
    assert found.path.read_bytes() == source.read_bytes()
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [
        "zoe_v1.json", "zoe_v1.safetensors"]  # no temporary file left
    assert find_registered(instance(s3_store, tmp_path / "c"), "t-1") is not None
    assert find_registered(other, "t-unknown") is None
    with pytest.raises(UnknownLoraError):
        other.get("zoe_v2")


def test_the_store_decides_a_registration(s3_store: StoreLocation, tmp_path: Path) -> None:
    first, other = instance(s3_store, tmp_path / "a"), instance(s3_store, tmp_path / "b")
    first.register("zoe_v1", fake_lora(tmp_path / "one.safetensors", fill=0.1),
                   trigger_word="zoe", base_model=None)
    with pytest.raises(FileExistsError, match="in the store"):  # b's disk has no zoe_v1
        other.register("zoe_v1", fake_lora(tmp_path / "two.safetensors", fill=0.2),
                       trigger_word="zoe", base_model=None)
    other.fetch(["zoe_v1"])
    assert other.get("zoe_v1").sha256 == first.get("zoe_v1").sha256  # the first one's
    assert other.versions("zoe") == [1]


def _spec(training_id: str) -> TrainingSpec:
    return TrainingSpec(training_id=training_id, request_id=training_id, conversation_id=None,
                        character_id="mia", trigger_word="miaxyz", caption="a photo of miaxyz",
                        steps=1, learning_rate=1e-4, resolution=64, batch_size=1,
                        origin="kafka")


def test_trainings_finishing_together_on_several_instances_get_distinct_versions(
        s3_store: StoreLocation, tmp_path: Path) -> None:
    import diffusers

    assert diffusers.FluxPipeline  # its lazy import is not thread-safe: done once here
    instances = [instance(s3_store, tmp_path / f"i{n}") for n in range(4)]
    start = threading.Barrier(len(instances))
    made: list[str] = []
    errors: list[BaseException] = []

    def finish(n: int, registry: LoraRegistry) -> None:
        generator = torch.Generator().manual_seed(n)
        weights = {f"transformer_blocks.0.attn.{m}.lora_{ab}.weight":
                   torch.randn(shape, generator=generator)
                   for m in ("to_q", "to_k")
                   for ab, shape in (("A", (LORA_RANK, 8)), ("B", (8, LORA_RANK)))}
        start.wait()  # all pick a version at the same moment
        try:
            info = register_lora(registry, TrainingFolder(tmp_path / f"t{n}"), _spec(f"t{n}"),
                                 weights, dtype=torch.float32, base_model="dev",
                                 training={"training_id": f"t{n}"})
            made.append(info.lora_id)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=finish, args=(n, r)) for n, r in enumerate(instances)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert sorted(made) == ["mia_v1", "mia_v2", "mia_v3", "mia_v4"]
    for n, registry in enumerate(instances):  # each training finds its own LoRA anywhere
        assert find_registered(instances[-1 - n], f"t{n}") is not None
        registry.fetch([f"mia_v{n + 1}"])
        assert registry.get(f"mia_v{n + 1}").alpha == LORA_ALPHA
