"""Trainings in the shared object store, so that one moved by a rebalance or a crash resumes
on its new owner from its last checkpoint, without fetching its photos again, and so that
every instance answers ``GET /train-lora/{id}`` with the live state.

Layout under ``trainings/{training_id}/`` (the local folder's, see
:mod:`core.training.checkpoint`):

- ``images/…`` then ``spec.json``: the checked inputs (the spec last: it marks them
  complete, as on disk);
- ``checkpoints/step-{n}/…`` (the adapter, the optimizer state) and the files beside
  them (``probe.json``), then ``checkpoint.json`` (``{"step": n}``) naming the complete
  one; older steps are deleted once the marker moved;
- ``status.json``: ``{"owner": …, "status": {…}}``, the latest status and who wrote it.

Inputs and checkpoints are deleted when the training ends (registered, or failed for
good); the status stays, for ``GET /train-lora/{id}`` anywhere. Every method is blocking
(requests to the store): call from a worker thread. Errors are
:class:`~core.storage.StorageError` (an ``OSError``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import asdict, fields

from core.files import atomic_write
from core.storage import ObjectStore, StorageError
from core.training.checkpoint import TrainingFolder
from core.training.status import TrainingStatus

__all__ = ["SharedTrainings"]

logger = logging.getLogger(__name__)

_SPEC = "spec.json"
_MARKER = "checkpoint.json"
_STATUS = "status.json"
_CHECKPOINTS = "checkpoints/"
_SKIPPED = {"cache.safetensors"}  # encoded data: cheaper to encode again than to move


class SharedTrainings:
    def __init__(self, objects: ObjectStore) -> None:
        self._objects = objects

    # --- inputs and checkpoints ---

    def save_inputs(self, folder: TrainingFolder) -> None:
        """Uploads the folder's images, then its spec (which marks the inputs complete)."""
        base = _base(folder)
        images = folder.path / "images"
        for image in sorted(images.iterdir()):
            self._objects.put_file(f"{base}images/{image.name}", image,
                                   content_type="application/octet-stream")
        self._objects.put_file(base + _SPEC, folder.path / _SPEC,
                               content_type="application/json")

    def save_checkpoint(self, folder: TrainingFolder, step: int) -> None:
        """Uploads checkpoint ``step`` (and the files beside the checkpoints), then moves
        the marker to it and deletes older ones."""
        base = _base(folder)
        name = f"step-{step:07d}"
        for file in sorted((folder.path / "checkpoints" / name).iterdir()):
            self._objects.put_file(f"{base}{_CHECKPOINTS}{name}/{file.name}", file,
                                   content_type="application/octet-stream")
        for file in folder.path.iterdir():  # probe losses and the like
            if file.is_file() and file.name not in _SKIPPED and file.name != _SPEC:
                self._objects.put_file(base + file.name, file,
                                       content_type="application/octet-stream")
        self._objects.put_bytes(base + _MARKER, json.dumps({"step": step}).encode())
        for key in self._objects.keys(base + _CHECKPOINTS):
            if not key.startswith(f"{base}{_CHECKPOINTS}{name}/"):
                self._objects.delete(key)

    def checkpoint_step(self, training_id: str) -> int | None:
        """The step of the training's latest complete checkpoint in the store, or None."""
        marker = self._objects.get_bytes(_key(training_id, _MARKER))
        return int(json.loads(marker)["step"]) if marker is not None else None

    def restore(self, folder: TrainingFolder) -> int | None:
        """Brings the training's inputs and its latest checkpoint from the store into
        ``folder`` (empty or absent); returns the checkpoint's step (0: none), or ``None``
        when the store has no complete inputs. The spec is written last, so a folder
        restored halfway holds no training."""
        base = _base(folder)
        spec = self._objects.get_bytes(base + _SPEC)
        if spec is None:
            return None
        folder.path.mkdir(parents=True, exist_ok=True)
        step = self.checkpoint_step(folder.path.name) or 0
        checkpoint = f"{base}{_CHECKPOINTS}step-{step:07d}/"
        staging = folder.path / f".tmp-{uuid.uuid4().hex[:8]}"
        try:
            for key in self._objects.keys(base):
                relative = key.removeprefix(base)
                if relative in (_SPEC, _MARKER, _STATUS) or (
                        relative.startswith(_CHECKPOINTS) and not key.startswith(checkpoint)):
                    continue
                if key.startswith(checkpoint):  # staged, then renamed whole
                    target = staging / relative.removeprefix(_CHECKPOINTS)
                else:
                    target = folder.path / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                if not self._objects.download(key, target):  # deleted meanwhile: a newer
                    raise StorageError(f"{key} went away while restoring")  # checkpoint
            if step:
                (folder.path / "checkpoints").mkdir(exist_ok=True)
                os.replace(staging / f"step-{step:07d}",
                           folder.path / "checkpoints" / f"step-{step:07d}")
            atomic_write(folder.path / _SPEC, spec)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        logger.info("training %s restored from the store at step %d", folder.path.name, step)
        return step

    def discard(self, training_id: str) -> None:
        """Deletes the training's inputs and checkpoints (its status stays)."""
        base = _key(training_id, "")
        for key in self._objects.keys(base):
            if key != base + _STATUS:
                self._objects.delete(key)

    # --- status ---

    def put_status(self, status: TrainingStatus, owner: str) -> None:
        self._objects.put_bytes(_key(status.training_id, _STATUS), json.dumps(
            {"owner": owner, "status": asdict(status)}).encode())

    def get_status(self, training_id: str) -> tuple[TrainingStatus, str] | None:
        """The latest status written for ``training_id`` and its writer, or ``None``."""
        raw = self._objects.get_bytes(_key(training_id, _STATUS))
        if raw is None:
            return None
        try:
            data = json.loads(raw)
            known = {f.name for f in fields(TrainingStatus)}
            status = TrainingStatus(**{k: v for k, v in data["status"].items() if k in known})
            return status, str(data["owner"])
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("status of training %s in the store is unreadable: %s",
                           training_id, exc)
            return None


def _key(training_id: str, name: str) -> str:
    return f"trainings/{training_id}/{name}"


def _base(folder: TrainingFolder) -> str:
    return _key(folder.path.name, "")
