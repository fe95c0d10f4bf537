"""The LoRA registry: ``character_lora_id`` → a safetensors file and its metadata.

``LORA_OUTPUT_DIR`` holds ``{lora_id}.safetensors`` and ``{lora_id}.json`` (trigger word,
rank, alpha, targets, base model, sha256, created_at, optional training info). A weights
file dropped in without its JSON is still served, with what its header tells.

Ids are safe names (``^[A-Za-z0-9_.-]{1,64}$``, not starting with a dot), so an id can never
name a path outside the folder. Unknown or unsafe ids raise :class:`UnknownLoraError`
(``UNKNOWN_LORA``) before any GPU work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from core.lora._header import LoraShape, read_lora_shape
from schemas.errors import InternalError, UnknownLoraError

__all__ = ["LoraInfo", "LoraRegistry", "file_sha256", "is_safe_lora_id"]

logger = logging.getLogger(__name__)

_SAFE_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_HASH_CHUNK = 1 << 20


def is_safe_lora_id(lora_id: str) -> bool:
    """Whether ``lora_id`` is a name the registry accepts (no separators, no leading dot)."""
    return bool(_SAFE_ID.match(lora_id)) and not lora_id.startswith(".")


@dataclass(frozen=True)
class LoraInfo:
    """One registered LoRA. ``sha256`` is the weights file's hash; ``fingerprint`` (the
    same) identifies its content for result caches."""

    lora_id: str
    path: Path
    trigger_word: str | None
    rank: int
    alpha: float
    targets: tuple[str, ...]
    base_model: str | None
    sha256: str
    created_at: str
    training: dict[str, Any] | None = field(default=None, compare=False, hash=False)

    @property
    def fingerprint(self) -> str:
        return self.sha256


class LoraRegistry:
    """The LoRAs in ``directory`` (created on first registration).

    Reads go to the disk every time (another process, the trainer, may register), with
    hashes of JSON-less files remembered by size and modification time.
    """

    def __init__(self, directory: Path, *, clock: Callable[[], datetime] | None = None) -> None:
        self._directory = Path(directory)
        self._clock = clock or (lambda: datetime.now(UTC))
        self._hashes: dict[tuple[str, int, int], str] = {}

    @property
    def directory(self) -> Path:
        return self._directory

    def get(self, lora_id: str) -> LoraInfo:
        """The LoRA registered as ``lora_id``.

        Raises :class:`UnknownLoraError` when the id is unsafe or has no weights file, and
        :class:`InternalError` when its metadata file exists but is unreadable.
        """
        if not isinstance(lora_id, str) or not is_safe_lora_id(lora_id):
            raise UnknownLoraError(f"unknown LoRA {lora_id!r}: not a valid LoRA id")
        weights = self._directory / f"{lora_id}.safetensors"
        if not weights.is_file():
            raise UnknownLoraError(f"unknown LoRA {lora_id!r}")
        meta_file = self._directory / f"{lora_id}.json"
        if meta_file.is_file():
            return self._from_metadata(lora_id, weights, meta_file)
        return self._from_weights(lora_id, weights)

    def list(self) -> list[LoraInfo]:
        """Every readable LoRA, sorted by id; unreadable ones are logged and left out."""
        found: list[LoraInfo] = []
        if not self._directory.is_dir():
            return found
        for weights in sorted(self._directory.glob("*.safetensors")):
            if not is_safe_lora_id(weights.stem):
                continue
            try:
                found.append(self.get(weights.stem))
            except (UnknownLoraError, InternalError) as exc:
                logger.warning("LoRA %s left out of the list: %s", weights.stem, exc)
        return found

    def register(
        self,
        lora_id: str,
        weights_file: Path,
        *,
        trigger_word: str | None,
        base_model: str | None,
        rank: int | None = None,
        alpha: float | None = None,
        training: dict[str, Any] | None = None,
        replace: bool = False,
    ) -> LoraInfo:
        """Copy ``weights_file`` in as ``lora_id`` and write its metadata; return its info.

        Rank, alpha and targets are read from the file (its peft metadata and tensor
        shapes); a ``rank``/``alpha`` given that disagrees raises ``ValueError``. The
        weights are copied under a temporary name and renamed, then the JSON likewise, so
        a reader never sees half a LoRA. Raises ``ValueError`` for an unsafe id or a file
        that is no LoRA, ``FileExistsError`` when the id exists and not ``replace``.
        """
        if not is_safe_lora_id(lora_id):
            raise ValueError(f"invalid LoRA id {lora_id!r}: allowed {_SAFE_ID.pattern}")
        shape = read_lora_shape(Path(weights_file))
        for name, given, found in (("rank", rank, shape.rank), ("alpha", alpha, shape.alpha)):
            if given is not None and float(given) != float(found):
                raise ValueError(f"{name}={given} given, but {weights_file} has {name} {found}")
        target = self._directory / f"{lora_id}.safetensors"
        if target.exists() and not replace:
            raise FileExistsError(f"LoRA {lora_id!r} is already registered")
        self._directory.mkdir(parents=True, exist_ok=True)
        digest = _atomic_copy(Path(weights_file), target)
        metadata: dict[str, Any] = {
            "lora_id": lora_id,
            "trigger_word": trigger_word,
            "rank": shape.rank,
            "alpha": shape.alpha,
            "targets": list(shape.targets),
            "base_model": base_model,
            "sha256": digest,
            "created_at": self._clock().isoformat(),
        }
        if training is not None:
            metadata["training"] = training
        _atomic_write(self._directory / f"{lora_id}.json", json.dumps(metadata, indent=2) + "\n")
        logger.info("registered LoRA %s (rank %d, sha256 %s)", lora_id, shape.rank, digest[:12])
        return self.get(lora_id)

    def _from_metadata(self, lora_id: str, weights: Path, meta_file: Path) -> LoraInfo:
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
            return LoraInfo(
                lora_id=lora_id,
                path=weights,
                trigger_word=meta.get("trigger_word"),
                rank=int(meta["rank"]),
                alpha=float(meta.get("alpha", meta["rank"])),
                targets=tuple(meta.get("targets", ())),
                base_model=meta.get("base_model"),
                sha256=str(meta["sha256"]),
                created_at=str(meta.get("created_at", "")),
                training=meta.get("training"),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InternalError(f"metadata of LoRA {lora_id!r} is unreadable: {exc}") from exc

    def _from_weights(self, lora_id: str, weights: Path) -> LoraInfo:
        try:
            shape: LoraShape = read_lora_shape(weights)
            stat = weights.stat()
        except (OSError, ValueError) as exc:
            raise InternalError(f"LoRA file {weights.name} is unreadable: {exc}") from exc
        key = (lora_id, stat.st_size, stat.st_mtime_ns)
        if key not in self._hashes:
            self._hashes[key] = file_sha256(weights)
        return LoraInfo(
            lora_id=lora_id, path=weights, trigger_word=None, rank=shape.rank,
            alpha=shape.alpha, targets=shape.targets, base_model=None, sha256=self._hashes[key],
            created_at=datetime.fromtimestamp(stat.st_mtime, UTC).isoformat(),
        )


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_copy(source: Path, target: Path) -> str:
    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with source.open("rb") as src, temporary.open("wb") as dst:
            shutil.copyfileobj(src, dst)
            dst.flush()
            os.fsync(dst.fileno())
        digest = file_sha256(temporary)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    return digest


def _atomic_write(target: Path, text: str) -> None:
    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with temporary.open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
