"""The LoRA registry: safe ids, atomic registration, metadata and fingerprints."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from core.lora import LoraRegistry
from schemas.errors import ErrorCode, InternalError, UnknownLoraError

CLOCK = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def fake_lora(path: Path, rank: int = 4, alpha: int | None = None, fill: float = 0.1) -> Path:
    """A small diffusers-style LoRA file (two attention projections)."""
    tensors = {}
    for module in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_out.0"):
        tensors[f"transformer.{module}.lora_A.weight"] = torch.full((rank, 8), fill)
        tensors[f"transformer.{module}.lora_B.weight"] = torch.full((8, rank), fill)
    metadata = None
    if alpha is not None:
        peft = {"transformer.r": rank, "transformer.lora_alpha": alpha,
                "transformer.target_modules": ["to_q", "to_out.0"]}
        metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(peft)}
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.fixture
def registry(tmp_path: Path) -> LoraRegistry:
    return LoraRegistry(tmp_path / "loras", clock=lambda: CLOCK)


def test_register_then_get(registry: LoraRegistry, tmp_path: Path) -> None:
    source = fake_lora(tmp_path / "trained.safetensors", rank=4, alpha=8)
    info = registry.register("sarah_v1", source, trigger_word="sarahxyz", base_model="flux-dev",
                             training={"steps": 200})
    expected_hash = hashlib.sha256(source.read_bytes()).hexdigest()
    assert info == registry.get("sarah_v1")
    assert info.path == registry.directory / "sarah_v1.safetensors"
    assert (info.rank, info.alpha, info.targets) == (4, 8.0, ("to_out.0", "to_q"))
    assert info.sha256 == info.fingerprint == expected_hash
    assert info.trigger_word == "sarahxyz" and info.base_model == "flux-dev"
    assert info.created_at == CLOCK.isoformat() and info.training == {"steps": 200}
    stored = json.loads((registry.directory / "sarah_v1.json").read_text())
    assert stored["sha256"] == expected_hash and stored["targets"] == ["to_out.0", "to_q"]
    assert sorted(p.name for p in registry.directory.iterdir()) == [
        "sarah_v1.json", "sarah_v1.safetensors",
    ]  # no temporary files left


@pytest.mark.parametrize("lora_id", [
    "missing", "../loras/x", "a/b", ".hidden", "..", "", "x" * 65, "a b", "é",
])
def test_unknown_or_unsafe_ids_are_unknown_lora(registry: LoraRegistry, lora_id: str) -> None:
    with pytest.raises(UnknownLoraError) as caught:
        registry.get(lora_id)
    assert caught.value.code == ErrorCode.UNKNOWN_LORA and not caught.value.retryable


def test_registration_refuses_bad_input(registry: LoraRegistry, tmp_path: Path) -> None:
    source = fake_lora(tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="invalid LoRA id"):
        registry.register("../evil", source, trigger_word="t", base_model=None)
    not_lora = tmp_path / "plain.safetensors"
    save_file({"weight": torch.zeros(2)}, str(not_lora))
    with pytest.raises(ValueError, match="no LoRA tensors"):
        registry.register("plain", not_lora, trigger_word="t", base_model=None)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a safetensors"):
        registry.register("junk", tmp_path / "junk.safetensors", trigger_word="t", base_model=None)
    with pytest.raises(ValueError, match="rank"):
        registry.register("a", source, trigger_word="t", base_model=None, rank=16)


def test_replacing_needs_consent_and_changes_the_fingerprint(
    registry: LoraRegistry, tmp_path: Path
) -> None:
    first = registry.register("zoe", fake_lora(tmp_path / "1.safetensors"), trigger_word="z",
                              base_model=None)
    second_file = fake_lora(tmp_path / "2.safetensors", fill=0.2)
    with pytest.raises(FileExistsError):
        registry.register("zoe", second_file, trigger_word="z", base_model=None)
    second = registry.register("zoe", second_file, trigger_word="z", base_model=None,
                               replace=True)
    assert second.fingerprint != first.fingerprint


def test_list_and_weights_without_metadata(registry: LoraRegistry, tmp_path: Path) -> None:
    registry.register("b_lora", fake_lora(tmp_path / "b.safetensors"), trigger_word="b",
                      base_model=None)
    dropped = fake_lora(registry.directory / "a.dropped.safetensors", rank=2)
    (registry.directory / "bad.json").write_text("{}")
    (registry.directory / "bad.safetensors").write_bytes(b"garbage")
    listed = registry.list()
    assert [info.lora_id for info in listed] == ["a.dropped", "b_lora"]
    plain = registry.get("a.dropped")
    assert plain.rank == 2 and plain.alpha == 2.0 and plain.trigger_word is None
    assert plain.fingerprint == hashlib.sha256(dropped.read_bytes()).hexdigest()
    with pytest.raises(InternalError, match="unreadable"):
        registry.get("bad")


def test_an_empty_or_absent_directory_lists_nothing(tmp_path: Path) -> None:
    assert LoraRegistry(tmp_path / "absent").list() == []
