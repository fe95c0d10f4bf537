"""Remembered image results: replays cost nothing twice.

A result is keyed by a fingerprint of the request's content (prompt, sizes, steps,
guidance, seed, negative prompt, LoRA id, optimization flag, and where they differ from
their defaults: LoRA scale, stacked LoRAs and their files, image count, format and
quality, the starting image's sha256 and strength), the model, the LoRA file, and how this
engine renders (:class:`Rendering`: every setting that changes the pixels beyond float
noise). Request defaults add nothing, so requests that do not use the newer fields keep
the keys they always had. Settings that change no pixel (batching, caches, timeouts,
compilation and FUSE_QKV, which stay within float noise, USE_FP16, which picks no other
dtype: bfloat16 on CUDA, float32 elsewhere) are left out, so a replay under them stays
free.
The entry keeps the prompt actually used, so that after the file was cleaned up a replay
regenerates the very same image (the LLM is not asked again). Entries are small (≈ 300
bytes) and bounded (RESULT_CACHE_MAX_ENTRIES, least recently used first, in
:class:`~core.remembered.RememberedResults`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from core.image.job import decoded_in_tiles
from core.image.params import ImageParams
from core.remembered import RememberedResults

__all__ = ["CachedResult", "Rendering", "ResultCache", "fingerprint"]


@dataclass(frozen=True)
class Rendering:
    """The engine's settings that change an image's pixels beyond float noise, besides
    the weights (the model's fingerprint): its device's kind (``cuda``, ``cpu``; an index
    is the same hardware) and dtype, the attention kernel (``ATTENTION_BACKEND``, which
    may name an approximate one), QUANTIZATION and STEP_CACHE (``acceleration``, their
    :attr:`~core.image.acceleration.Acceleration.key`), FLUX_MAX_SEQUENCE_LENGTH (T5's
    prompt is padded to it, and FLUX attends to the padding), TRUE_CFG_SCALE (with a
    negative prompt only) and VAE_TILING_THRESHOLD (whether an image of its size is
    decoded in tiles)."""

    device: str
    dtype: str
    attention_backend: str
    acceleration: str
    max_sequence_length: int
    true_cfg_scale: float
    vae_tiling_threshold: int

    def key(self, params: ImageParams) -> dict[str, Any]:
        """The part of the result key for ``params``: the settings that apply to it."""
        content: dict[str, Any] = {
            "device": self.device.partition(":")[0], "dtype": self.dtype,
            "attention": self.attention_backend, "acceleration": self.acceleration,
            "max_sequence_length": self.max_sequence_length,
        }
        if params.negative_prompt:
            content["true_cfg_scale"] = self.true_cfg_scale
        if decoded_in_tiles(params.width, params.height, self.vae_tiling_threshold):
            content["vae_tiled"] = True
        return content


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
                rendering: Rendering, stacked_hashes: tuple[str, ...] = (),
                init_hash: str | None = None) -> str:
    """The result cache's key; ``rendering`` the engine's pixel-changing settings,
    ``stacked_hashes`` the files of ``params.loras`` and ``init_hash`` the starting image's
    sha256, in that order."""
    content: dict[str, Any] = {
        "prompt": params.prompt, "negative_prompt": params.negative_prompt,
        "width": params.width, "height": params.height, "steps": params.steps,
        "guidance": params.guidance, "seed": params.seed, "lora_id": params.lora_id,
        "optimize_prompt": params.optimize_prompt, "model": model_fingerprint,
        "lora_hash": lora_hash, "rendering": rendering.key(params),
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
    """Image results by fingerprint, stored in ``store`` (one small JSON file per key,
    written atomically, bounded; thread-safe)."""

    def __init__(self, store: RememberedResults) -> None:
        self._store = store

    @property
    def shared(self) -> bool:
        """Whether a lookup may ask the object store (then: from a worker thread)."""
        return self._store.shared

    def get(self, key: str) -> CachedResult | None:
        """The result remembered under ``key``; ``None`` when none or unreadable (an entry
        of another version of the engine is simply not used)."""
        raw = self._store.get(key)
        if raw is None:
            return None
        try:
            return CachedResult(**raw)
        except TypeError:
            return None

    def put(self, key: str, result: CachedResult) -> None:
        """Remember ``result`` under ``key``. Raises ``OSError`` when the disk fails."""
        self._store.put(key, asdict(result))
