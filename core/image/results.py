"""Remembered image results: replays cost nothing twice.

A result is keyed by a fingerprint of the request's content (prompt, sizes, steps,
guidance, seed, negative prompt, LoRA id, optimization flag, and where they differ from
their defaults: LoRA scale, stacked LoRAs and their files, image count, format and
quality, the starting image's sha256 and strength), the model and the LoRA file. Defaults
add nothing, so requests that do not use the newer fields keep the keys they always had.
The entry keeps the prompt actually used, so that after the file was cleaned up a replay
regenerates the very same image (the LLM is not asked again). Entries are small (≈ 300
bytes) but would otherwise only grow: at most ``max_entries`` are kept, the least recently
used leaving first (a hit refreshes an entry's time).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from core.image.params import ImageParams

__all__ = ["CachedResult", "ResultCache", "fingerprint"]


@dataclass(frozen=True)
class CachedResult:
    image_id: str
    filename: str
    prompt: str
    width: int
    height: int
    seed: int
    # every image of a request that made several: {"image_id", "filename", "seed"}
    images: list[dict[str, Any]] = field(default_factory=list)


def fingerprint(params: ImageParams, model_fingerprint: str, lora_hash: str | None, *,
                stacked_hashes: tuple[str, ...] = (), init_hash: str | None = None) -> str:
    """The result cache's key; ``stacked_hashes`` are the files of ``params.loras`` and
    ``init_hash`` the starting image's sha256, in that order."""
    content: dict[str, Any] = {
        "prompt": params.prompt, "negative_prompt": params.negative_prompt,
        "width": params.width, "height": params.height, "steps": params.steps,
        "guidance": params.guidance, "seed": params.seed, "lora_id": params.lora_id,
        "optimize_prompt": params.optimize_prompt, "model": model_fingerprint,
        "lora_hash": lora_hash,
    }
    if params.lora_scale != 1.0:
        content["lora_scale"] = params.lora_scale
    if params.loras:
        content["loras"] = [[lora_id, scale, digest] for (lora_id, scale), digest
                            in zip(params.loras, stacked_hashes, strict=True)]
    if params.num_images != 1:
        content["num_images"] = params.num_images
    if params.output_format != "png":
        content["output"] = [params.output_format, params.output_quality]
    if init_hash is not None:
        content["init_image"] = [init_hash, params.strength]
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


class ResultCache:
    """One small JSON file per fingerprint, written atomically; thread-safe."""

    def __init__(self, directory: Path, *, max_entries: int = 100_000) -> None:
        if max_entries < 1:
            raise ValueError(f"RESULT_CACHE_MAX_ENTRIES must be >= 1, got {max_entries}")
        self._directory = directory
        self._max = max_entries
        self._prune_every = max(1, min(1000, max_entries // 10))
        self._puts = 0
        self._lock = threading.Lock()
        directory.mkdir(parents=True, exist_ok=True)

    def get(self, key: str) -> CachedResult | None:
        path = self._directory / f"{key}.json"
        try:
            entry = CachedResult(**json.loads(path.read_text()))
            os.utime(path)  # recently used: the last to leave
            return entry
        except (OSError, ValueError, TypeError):
            return None

    def put(self, key: str, result: CachedResult) -> None:
        fd, temp = tempfile.mkstemp(dir=self._directory, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w") as handle:
            json.dump(asdict(result), handle)
        os.replace(temp, self._directory / f"{key}.json")
        with self._lock:
            self._puts += 1
            due = self._puts % self._prune_every == 0
        if due:
            self.prune()

    def prune(self) -> int:
        """Removes the least recently used entries beyond ``max_entries``; returns how
        many."""
        with self._lock:
            entries = []
            with os.scandir(self._directory) as found:
                for entry in found:
                    if entry.name.endswith(".json") and not entry.name.startswith("."):
                        try:
                            entries.append((entry.stat().st_mtime, entry.path))
                        except OSError:
                            continue
            excess = len(entries) - self._max
            if excess <= 0:
                return 0
            entries.sort()
            for _, path in entries[:excess]:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
            return excess
