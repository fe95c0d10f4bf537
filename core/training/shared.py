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
- ``status.json``: ``{"owner": …, "origin": "kafka"|"http", "status": {…}}``, the latest
  status and who wrote it. Its ``updated_at`` is the owner's heartbeat: a status in
  ``queued`` or ``training`` is *live* while younger than a lease
  (:data:`core.training.lease.STATUS_LEASE_SECONDS`); an older one belongs to an
  instance that is gone.

The status is also the claim on an HTTP training (:meth:`SharedTrainings.claim`): an
instance about to take one in first creates its status (``If-None-Match: *``), or takes
over one that is not live by a conditional update on its ETag (``If-Match``), so two
instances that receive the same request at once never both train it.

Inputs and checkpoints are deleted when the training ends (registered, or failed for
good); the status stays, for ``GET /train-lora/{id}`` anywhere. Every method is blocking
(requests to the store): call from a worker thread. Errors are
:class:`~core.storage.StorageError` (an ``OSError``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime

from core.files import atomic_write
from core.storage import ObjectStore, StorageError
from core.training.checkpoint import TrainingFolder
from core.training.spec import Origin
from core.training.status import TrainingStatus
from schemas.events import parse_instant

__all__ = ["SharedTrainings", "StoredStatus"]

logger = logging.getLogger(__name__)

_SPEC = "spec.json"
_MARKER = "checkpoint.json"
_STATUS = "status.json"
_CHECKPOINTS = "checkpoints/"
_SKIPPED = {"cache.safetensors"}  # encoded data: cheaper to encode again than to move
_STEP = re.compile(r"step-(\d+)/")
_CLAIM_ATTEMPTS = 3  # each lost only to a status written meanwhile


@dataclass(frozen=True)
class StoredStatus:
    """A training's status as the store holds it: who wrote it (``owner``), for a
    training that came by Kafka or HTTP (``origin``; ``None`` when not said)."""

    status: TrainingStatus
    owner: str
    origin: Origin | None

    def live(self, lease: float) -> bool:
        """Whether its owner is at it: queued or training, and written less than
        ``lease`` seconds ago (an unreadable time counts as long ago)."""
        return self.status.state in ("queued", "training") and \
            _age_seconds(self.status.updated_at) < lease


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
        for key in self._objects.keys(base + _CHECKPOINTS):  # older ones only: a later
            found = _STEP.match(key.removeprefix(base + _CHECKPOINTS))  # one is never ours
            if found is None or int(found.group(1)) < step:  # to throw away
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

    def put_status(self, status: TrainingStatus, owner: str, origin: Origin) -> None:
        """Writes ``status`` as ``owner``'s, whatever was there."""
        self._objects.put_bytes(_key(status.training_id, _STATUS),
                                _status_document(status, owner, origin))

    def get_status(self, training_id: str) -> StoredStatus | None:
        """The latest status written for ``training_id``, or ``None`` (none, or
        unreadable: logged)."""
        raw = self._objects.get_bytes(_key(training_id, _STATUS))
        return _parse_status(training_id, raw) if raw is not None else None

    def claim(self, status: TrainingStatus, owner: str, origin: Origin, *,
              lease: float) -> StoredStatus | None:
        """Makes ``owner`` the one at the training: writes ``status`` as its status if
        there is none (a conditional create), or over one that is not live (see
        :meth:`StoredStatus.live`: finished, failed, abandoned) or is ``owner``'s own (a
        conditional update on the version read). ``None`` then; the live status of
        another owner when there is one (nothing written). Raises
        :class:`~core.storage.StorageError` when the store fails, or the status changed
        under every attempt."""
        key = _key(status.training_id, _STATUS)
        document = _status_document(status, owner, origin)
        for _ in range(_CLAIM_ATTEMPTS):
            found = self._objects.get_versioned(key)
            if found is None:
                if self._objects.create(key, document):
                    return None
                continue  # created meanwhile: read it
            raw, version = found
            stored = _parse_status(status.training_id, raw)
            if stored is not None and stored.owner != owner and stored.live(lease):
                return stored
            if version is None:
                raise StorageError(f"{self._objects.where} gives no ETag: the status of "
                                   f"training {status.training_id} cannot be taken over")
            if self._objects.update(key, document, version):
                return None
        raise StorageError(f"the status of training {status.training_id} changed under "
                           f"each of {_CLAIM_ATTEMPTS} claims")

    def drop_status(self, training_id: str) -> None:
        """Deletes the training's status (a claim given up before anything was kept)."""
        self._objects.delete(_key(training_id, _STATUS))


def _status_document(status: TrainingStatus, owner: str, origin: Origin) -> bytes:
    return json.dumps({"owner": owner, "origin": origin, "status": asdict(status)}).encode()


def _parse_status(training_id: str, raw: bytes) -> StoredStatus | None:
    try:
        data = json.loads(raw)
        known = {f.name for f in fields(TrainingStatus)}
        status = TrainingStatus(**{k: v for k, v in data["status"].items() if k in known})
        origin = data.get("origin")
        return StoredStatus(status, str(data["owner"]),
                            origin if origin in ("kafka", "http") else None)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        logger.warning("status of training %s in the store is unreadable: %s",
                       training_id, exc)
        return None


def _age_seconds(instant: str) -> float:
    """Seconds since ``instant`` (ISO-8601); unreadable counts as long ago."""
    try:
        return (datetime.now(UTC) - parse_instant(instant)).total_seconds()
    except (ValueError, OverflowError):
        return float("inf")


def _key(training_id: str, name: str) -> str:
    return f"trainings/{training_id}/{name}"


def _base(folder: TrainingFolder) -> str:
    return _key(folder.path.name, "")
