"""Remembered image results: replays cost nothing twice.

A result is keyed by a fingerprint of the request's content (prompt, sizes, steps,
guidance, seed, negative prompt, LoRA id, optimization flag), the model and the LoRA file.
The entry keeps the prompt actually used, so that after the file was cleaned up a replay
regenerates the very same image (the LLM is not asked again).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

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


def fingerprint(params: ImageParams, model_fingerprint: str, lora_hash: str | None) -> str:
    content = {
        "prompt": params.prompt, "negative_prompt": params.negative_prompt,
        "width": params.width, "height": params.height, "steps": params.steps,
        "guidance": params.guidance, "seed": params.seed, "lora_id": params.lora_id,
        "optimize_prompt": params.optimize_prompt, "model": model_fingerprint,
        "lora_hash": lora_hash,
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


class ResultCache:
    """One small JSON file per fingerprint, written atomically."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def get(self, key: str) -> CachedResult | None:
        try:
            return CachedResult(**json.loads((self._directory / f"{key}.json").read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def put(self, key: str, result: CachedResult) -> None:
        fd, temp = tempfile.mkstemp(dir=self._directory, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w") as handle:
            json.dump(asdict(result), handle)
        os.replace(temp, self._directory / f"{key}.json")
