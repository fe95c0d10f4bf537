"""The sha256 of a LoRA file: its identity in the registry and in result caches."""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["file_sha256"]

_HASH_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
