"""A training's files under ``TEMP_DIR/training/{training_id}/``.

::

    spec.json                 the validated request (written last of the inputs)
    images/{i:02d}.{png|jpg|webp}   the checked images, as received
    cache.safetensors         VAE latent mean/std + caption embeddings (once encoded)
    checkpoints/step-{n:07d}/ adapter.safetensors (LoRA weights, fp32)
                              state.pt (step, AdamW state, RNG state, smoothed loss)
    final/{lora_id}.safetensors   the LoRA handed to the registry

Every file is written under a temporary name, fsynced and renamed; a checkpoint is a
folder built under a temporary name and renamed, so any ``step-*`` folder is complete
and the highest one is the latest (older ones are removed after a new one is in place).
A crash at any moment leaves either the previous checkpoint or the new one. A folder
without ``spec.json`` holds no training (it is removed when found). An uploaded image is
hard-linked into ``images/`` when it lies on the same filesystem, else copied, never read
into memory whole.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from core.files import atomic_path, atomic_write, fsync_directory
from core.lora.metadata import portable_metadata
from core.training.adapter import lora_config
from core.training.encode import TrainingCache
from core.training.images import CheckedImage
from core.training.spec import TrainingSpec
from core.training.trainer import TrainState

__all__ = ["TrainingFolder", "TrainingStore"]

logger = logging.getLogger(__name__)

_STEP_PREFIX = "step-"


class TrainingFolder:
    """The files of one training (see the module docstring). Blocking I/O: call its
    methods off the event loop."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def _checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def exists(self) -> bool:
        return (self.path / "spec.json").is_file()

    def write_inputs(self, spec: TrainingSpec, images: Sequence[CheckedImage]) -> None:
        """Write the checked images, then the spec (its presence marks complete inputs)."""
        folder = self.path / "images"
        folder.mkdir(parents=True, exist_ok=True)
        for index, image in enumerate(images):
            target = folder / f"{index:02d}.{image.suffix}"
            if image.path is not None:
                with atomic_path(target) as temporary:
                    _link_or_copy(image.path, temporary)
            else:
                atomic_write(target, image.data)
        atomic_write(self.path / "spec.json", spec.to_json().encode())

    def touch(self) -> None:
        """Mark the folder active now (see :meth:`last_active`); nothing when it is gone."""
        try:
            os.utime(self.path)
        except FileNotFoundError:
            pass

    def last_active(self) -> float:
        """When the folder last changed (epoch seconds): the newest modification time of
        the folder, its files and its checkpoints folder; 0.0 when it is gone."""
        newest = 0.0
        for path in (self.path, self._checkpoints):
            try:
                newest = max(newest, path.stat().st_mtime)
                with os.scandir(path) as entries:
                    for entry in entries:
                        newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
            except (FileNotFoundError, NotADirectoryError):
                continue
        return newest

    def idle_seconds(self) -> float:
        """Seconds since :meth:`last_active` (infinite when the folder is gone)."""
        last = self.last_active()
        return time.time() - last if last else float("inf")

    def read_spec(self) -> TrainingSpec | None:
        """The spec, or None when there is none or it is unreadable."""
        try:
            return TrainingSpec.from_json((self.path / "spec.json").read_text("utf-8"))
        except (OSError, ValueError, TypeError, KeyError):
            return None

    def read_images(self, spec: TrainingSpec) -> list[bytes]:
        """The images in order; raises ``OSError`` when one is missing."""
        folder = self.path / "images"
        found = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
        if len(found) != spec.image_count:
            raise OSError(f"{folder} holds {len(found)} images, the spec says "
                          f"{spec.image_count}")
        return [p.read_bytes() for p in found]

    def write_cache(self, cache: TrainingCache) -> None:
        from safetensors.torch import save_file

        with atomic_path(self.path / "cache.safetensors") as temporary:
            save_file({k: v.contiguous() for k, v in cache.tensors().items()}, str(temporary))

    def read_cache(self) -> TrainingCache | None:
        """The encoded data, or None when absent or unreadable (then it is encoded again)."""
        from safetensors.torch import load_file

        try:
            return TrainingCache.from_tensors(load_file(str(self.path / "cache.safetensors")))
        except (OSError, KeyError, ValueError, RuntimeError):
            return None

    def save_checkpoint(self, state: TrainState) -> Path:
        """Write ``state`` as ``checkpoints/step-{n}`` atomically; older ones are removed."""
        from safetensors.torch import save_file

        self._checkpoints.mkdir(parents=True, exist_ok=True)
        target = self._checkpoints / f"{_STEP_PREFIX}{state.step:07d}"
        staging = self._checkpoints / f".tmp-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            save_file({k: v.contiguous() for k, v in state.weights.items()},
                      str(staging / "adapter.safetensors"))
            torch.save({"step": state.step, "optimizer": state.optimizer, "rng": state.rng,
                        "loss": state.loss}, staging / "state.pt")
            for file in staging.iterdir():
                _fsync_file(file)
            if target.exists():  # the same step again after a resume: same content
                shutil.rmtree(target)
            os.replace(staging, target)
            fsync_directory(self._checkpoints, strict=True)  # the rename must be on disk
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        for older in self._checkpoints.iterdir():
            if older != target:
                shutil.rmtree(older, ignore_errors=True)
        return target

    def latest_step(self) -> int:
        """The step of the newest checkpoint by its folder name (0 when there is none)."""
        if not self._checkpoints.is_dir():
            return 0
        steps = [int(p.name.removeprefix(_STEP_PREFIX)) for p in self._checkpoints.iterdir()
                 if p.name.startswith(_STEP_PREFIX) and p.name[len(_STEP_PREFIX):].isdigit()]
        return max(steps, default=0)

    def latest_checkpoint(self) -> TrainState | None:
        """The newest complete checkpoint, or None. An unreadable one is skipped (logged)."""
        from safetensors.torch import load_file

        if not self._checkpoints.is_dir():
            return None
        folders = sorted((p for p in self._checkpoints.iterdir()
                          if p.name.startswith(_STEP_PREFIX)), reverse=True)
        for folder in folders:
            try:
                weights = load_file(str(folder / "adapter.safetensors"))
                saved: dict[str, Any] = torch.load(folder / "state.pt", weights_only=True)
                return TrainState(step=int(saved["step"]), weights=weights,
                                  optimizer=saved["optimizer"], rng=saved["rng"],
                                  loss=saved["loss"])
            except (OSError, KeyError, ValueError, RuntimeError) as exc:
                logger.warning("checkpoint %s is unreadable, skipped: %s", folder, exc)
        return None

    def write_lora(self, lora_id: str, weights: dict[str, torch.Tensor],
                   dtype: torch.dtype) -> Path:
        """The final LoRA in diffusers' format, with its adapter metadata (rank, alpha,
        targets), weights in ``dtype``; returns its path."""
        import diffusers

        folder = self.path / "final"
        folder.mkdir(parents=True, exist_ok=True)
        metadata = portable_metadata(lora_config())
        pipeline_class: Any = diffusers.FluxPipeline
        pipeline_class.save_lora_weights(
            folder, transformer_lora_layers={k: v.to(dtype) for k, v in weights.items()},
            weight_name=f"{lora_id}.safetensors",
            transformer_lora_adapter_metadata=metadata)
        return folder / f"{lora_id}.safetensors"

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class TrainingStore:
    """``root`` (``TEMP_DIR/training``) holds one :class:`TrainingFolder` per training."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def folder(self, training_id: str) -> TrainingFolder:
        return TrainingFolder(self.root / training_id)

    def training_ids(self) -> list[str]:
        """The names of every training folder, sorted. Blocking."""
        if not self.root.is_dir():
            return []
        return sorted(path.name for path in self.root.iterdir()
                      if path.is_dir() and not path.name.startswith("."))

    def complete_spec(self, training_id: str) -> TrainingSpec | None:
        """The spec of folder ``training_id`` when its inputs are complete (a readable spec
        of that very id), else None. Blocking."""
        spec = self.folder(training_id).read_spec()
        return spec if spec is not None and spec.training_id == training_id else None


def _link_or_copy(source: Path, target: Path) -> None:
    """``source``'s content at ``target``: a hard link when both share a filesystem (no
    copy at all), else a streamed copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _fsync_file(path: Path) -> None:
    with path.open("rb") as handle:
        os.fsync(handle.fileno())
