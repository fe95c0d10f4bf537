"""The LoRA registry in the shared object store: what every instance of a fleet can use.

Layout under the store's prefix:

- ``loras/blobs/{sha256}.safetensors``: weights, by content (written first; writing the
  same content twice is harmless, so two writers never spoil each other's file);
- ``loras/{lora_id}.json``: the registration: the metadata, ``sha256`` naming its blob.
  It is created with a conditional put (``If-None-Match: *``), which decides between two
  trainings that picked the same id at once: the second is told the id is taken and
  takes the next version. It is written only once its blob is complete, so no reader ever
  finds a LoRA without its metadata or its weights;
- ``loras/trainings/{training_id}.json``: ``{"lora_id": …}``, so that the LoRA a training
  made is found without listing every registration. It is written *before* the
  registration and counts only when the registration it names names that training back:
  so a registration never exists without its index, whatever fails (or is killed) between
  the two writes, and a retried training finds the LoRA it registered instead of taking
  the next version. An index whose registration is missing (the create failed) or belongs
  to another training (the id was taken meanwhile) is an attempt that did not register.

Every method is blocking (requests to the store): call from a worker thread. Errors are
:class:`~core.storage.StorageError` (an ``OSError``).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.files import atomic_path, atomic_write
from core.lora.hashing import file_sha256
from core.lora.ids import is_safe_lora_id
from core.storage import ObjectStore

__all__ = ["Registration", "SharedLoras"]

logger = logging.getLogger(__name__)

_PREFIX = "loras/"


@dataclass(frozen=True)
class Registration:
    """A LoRA's registration as the store holds it: ``lora_id`` (a safe id) and ``body``,
    the bytes of ``loras/{lora_id}.json``."""

    lora_id: str
    body: bytes


class SharedLoras:
    def __init__(self, objects: ObjectStore) -> None:
        self._objects = objects

    @property
    def where(self) -> str:
        """Where registrations live (``s3://bucket/prefix/loras/``), for events and logs."""
        return f"{self._objects.where.rstrip('/')}/{_PREFIX}"

    def location(self, lora_id: str) -> str:
        """Where ``lora_id``'s registration is, as a URL of the store."""
        return f"{self.where}{lora_id}.json"

    def publish(self, lora_id: str, weights: Path, metadata: dict[str, Any], *,
                replace: bool = False) -> bool:
        """Uploads ``weights`` (whose sha256 is ``metadata["sha256"]``), then registers
        ``lora_id`` with ``metadata``: created only if no registration of that id exists
        (``False`` then), or, with ``replace``, written over (an update of one's own)."""
        self._objects.put_file(f"{_PREFIX}blobs/{metadata['sha256']}.safetensors", weights,
                               content_type="application/octet-stream")
        body = json.dumps(metadata, indent=2).encode() + b"\n"
        key = f"{_PREFIX}{lora_id}.json"
        training_id = _training_id(metadata)
        if replace:
            self._objects.put_bytes(key, body)
            return True
        if training_id is not None:  # the index first: see the module docstring
            self._objects.put_bytes(f"{_PREFIX}trainings/{training_id}.json",
                                    json.dumps({"lora_id": lora_id}).encode())
        return self._objects.create(key, body)

    def fetch(self, lora_id: str, directory: Path, *, registration: bytes | None = None
              ) -> bool:
        """Copies ``lora_id`` from the store into ``directory`` as the local registry
        keeps it (``{id}.safetensors``, then ``{id}.json``, each written under a temporary
        name and renamed); ``False`` when the store has no such LoRA. ``registration``:
        its registration's bytes when already read (:meth:`made_by`), not read again."""
        raw = registration if registration is not None else self._objects.get_bytes(
            f"{_PREFIX}{lora_id}.json")
        if raw is None:
            return False
        metadata = json.loads(raw)
        digest = str(metadata["sha256"])
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ValueError(f"registration of {lora_id} names no sha256")
        directory.mkdir(parents=True, exist_ok=True)
        blob = f"{_PREFIX}blobs/{digest}.safetensors"
        with atomic_path(directory / f"{lora_id}.safetensors") as weights:
            if not self._objects.download(blob, weights):  # then nothing written there
                logger.warning("LoRA %s is registered in the store without its weights %s",
                               lora_id, blob)
                return False
            if file_sha256(weights) != digest:
                raise ValueError(f"weights of {lora_id} in the store are not {digest}")
            # the metadata first, the weights last (as this block ends): a reader that finds
            # the weights always finds their metadata beside them (never a LoRA without its
            # trigger)
            atomic_write(directory / f"{lora_id}.json", raw)
        logger.info("LoRA %s fetched from %s", lora_id, self.where)
        return True

    def versions(self, character_id: str) -> list[int]:
        """The versions ``n`` of ``{character_id}_v{n}`` registered in the store."""
        pattern = re.compile(rf"^{re.escape(_PREFIX + character_id)}_v(\d+)\.json$")
        return [int(match.group(1)) for key in self._objects.keys(_PREFIX)
                if (match := pattern.match(key))]

    def made_by(self, training_id: str) -> Registration | None:
        """The registration of the LoRA training ``training_id`` registered, or ``None``:
        the one its index names, if that registration names this training back."""
        raw = self._objects.get_bytes(f"{_PREFIX}trainings/{training_id}.json")
        try:
            found = json.loads(raw)["lora_id"] if raw is not None else None
        except (ValueError, KeyError, TypeError):
            return None
        if not isinstance(found, str) or not is_safe_lora_id(found):
            return None
        registration = self._objects.get_bytes(f"{_PREFIX}{found}.json")
        if not registration:
            return None
        try:
            named = _training_id(json.loads(registration))
        except (ValueError, TypeError, AttributeError):
            return None
        return Registration(found, registration) if named == training_id else None


def _training_id(metadata: dict[str, Any]) -> str | None:
    """The training a registration's metadata says made it, if any."""
    training = metadata.get("training")
    found = training.get("training_id") if isinstance(training, dict) else None
    return found if isinstance(found, str) and found else None
