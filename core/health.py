"""The engine's health, as ``/health`` and the probes report it.

Components report into one :class:`EngineHealth` (the consumer runtime its Kafka state,
the entry point readiness and draining, the GPU worker its pulse); the HTTP layer only
reads :meth:`EngineHealth.snapshot` (``/health``), :meth:`EngineHealth.liveness`
(``/health/live``) and :meth:`EngineHealth.readiness` (``/health/ready``).
Nothing secret is ever stored here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["EngineHealth", "GpuInfo", "ImageModelInfo", "VoiceQuota", "WorkerPulse",
           "probe_gpu"]


@dataclass(frozen=True)
class GpuInfo:
    available: bool
    name: str | None = None
    memory_total_mb: int | None = None
    memory_allocated_mb: int | None = None


@dataclass(frozen=True)
class ImageModelInfo:
    """``dtype``: what the model computes in (``bfloat16``, ``float32``), once loaded;
    ``acceleration``: QUANTIZATION, STEP_CACHE (with its threshold or interval) and
    whether the transformer is compiled."""

    name: str | None = None
    loaded: bool = False
    development_model: bool = False
    dtype: str | None = None
    acceleration: dict[str, Any] | None = None


@dataclass(frozen=True)
class VoiceQuota:
    """The voice provider's character quota: ``used`` of ``limit`` in the current period,
    the plan's ``tier``, when it resets (ISO-8601 UTC); ``error`` is the engine error code
    of the last failed check (the figures are then the last known ones, or ``None``)."""

    used: int | None = None
    limit: int | None = None
    tier: str | None = None
    resets_at: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class WorkerPulse:
    """What the GPU worker thread is doing: ``idle`` (waiting for work), ``busy`` on one
    item for ``busy_seconds``, ``stopped`` on purpose, or ``dead`` (its thread ended
    without a stop)."""

    state: Literal["idle", "busy", "stopped", "dead"]
    busy_seconds: float | None = None


def probe_gpu() -> GpuInfo:
    """What torch sees of CUDA; a CPU-only build reports ``available: false``."""
    import torch

    if not torch.cuda.is_available():
        return GpuInfo(available=False)
    index = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return GpuInfo(
        available=True,
        name=props.name,
        memory_total_mb=props.total_memory // 2**20,
        memory_allocated_mb=torch.cuda.memory_allocated(index) // 2**20,
    )


@dataclass
class EngineHealth:
    voice_backend: str
    kafka_enabled: bool = True
    started: bool = False
    warming: bool = False  # the warm-up images are being made (core/image/warmup.py)
    kafka_connected: bool = False
    kafka_problem: str | None = None  # why the broker refuses us (credentials, TLS), if known
    kafka_security: str = "PLAINTEXT"  # protocol and mechanism, never a secret
    assigned: list[tuple[str, int]] = field(default_factory=list)
    paused_kinds: list[str] = field(default_factory=list)  # fetching held back: kind is full
    image_model: ImageModelInfo = field(default_factory=ImageModelInfo)
    gpu: GpuInfo = field(default_factory=lambda: GpuInfo(available=False))
    voice_quota: VoiceQuota | None = None
    queues: Callable[[], dict[str, dict[str, int]]] | None = None  # waiting, kind → priority
    draining: bool = False  # a stop was requested: readiness is false from then on
    gpu_worker: Callable[[], WorkerPulse] | None = None  # None: no image model here
    gpu_stuck_seconds: float = 900.0  # on one item longer than this: wedged
    schema_registry_url: str | None = None  # SCHEMA_REGISTRY_URL (never credentials)
    schema_registry_reachable: bool | None = None  # None until the first call
    store_where: str | None = None  # STORAGE_URL (s3://bucket/prefix), None: local folders
    store_reachable: bool | None = None  # None until the first call

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        for waiter in self.__dict__.get("_waiters", ()):
            if not waiter.done():
                waiter.set_result(None)

    async def wait_until(self, predicate: Callable[[EngineHealth], bool], timeout: float) -> None:
        """Waits until ``predicate(self)`` holds, woken by every change (no polling).

        Raises ``TimeoutError`` when it does not hold within ``timeout`` seconds.
        """
        waiters: list[asyncio.Future[None]] = self.__dict__.setdefault("_waiters", [])

        async def watch() -> None:
            while not predicate(self):
                waiter = asyncio.get_running_loop().create_future()
                waiters.append(waiter)
                try:
                    await waiter
                finally:
                    waiters.remove(waiter)

        await asyncio.wait_for(watch(), timeout)

    @property
    def status(self) -> str:
        if not self.started:
            return "starting"
        if self.kafka_enabled and not self.kafka_connected:
            return "degraded"
        if self.schema_registry_reachable is False:  # publishing waits for it meanwhile
            return "degraded"
        if self.store_reachable is False:  # outputs, LoRAs and trainings fail meanwhile
            return "degraded"
        return "ok"

    def liveness(self) -> dict[str, Any]:
        """``/health/live``: ``status`` ``live``, or ``wedged`` when the GPU worker thread
        died or has been on one item (an image call, a training chunk) longer than
        ``gpu_stuck_seconds``. Kafka, the model and draining do not count: a restart
        would not mend them. (A wedged event loop cannot answer at all.)"""
        pulse = self.gpu_worker() if self.gpu_worker is not None else None
        if pulse is None:
            worker: dict[str, Any] = {"state": "none", "busy_seconds": None}
        else:
            busy = pulse.busy_seconds
            stuck = pulse.state == "busy" and busy is not None and busy > self.gpu_stuck_seconds
            worker = {"state": "stuck" if stuck else pulse.state,
                      "busy_seconds": None if busy is None else round(busy, 3)}
        wedged = worker["state"] in ("stuck", "dead")
        return {"status": "wedged" if wedged else "live", "gpu_worker": worker}

    def readiness(self) -> dict[str, Any]:
        """``/health/ready``: ``status`` ``ready`` once started (the image model loaded
        and warmed up: compiled, with COMPILE_TRANSFORMER), while Kafka is connected and no
        stop was requested; otherwise ``not_ready`` with the ``reasons`` (``starting``,
        ``warming``: the warm-up images are being made, ``kafka_unreachable``,
        ``draining``)."""
        reasons = [reason for reason, holds in (
            ("starting", not self.started),
            ("warming", self.warming),
            ("kafka_unreachable", self.kafka_enabled and not self.kafka_connected),
            ("draining", self.draining)) if holds]
        return {"status": "not_ready" if reasons else "ready", "reasons": reasons}

    def _voice(self) -> dict[str, Any]:
        voice: dict[str, Any] = {"backend": self.voice_backend}
        quota = self.voice_quota
        if quota is not None:  # only a backend with an account has one
            voice["quota"] = {"used": quota.used, "limit": quota.limit, "tier": quota.tier,
                              "resets_at": quota.resets_at, "error": quota.error}
        return voice

    def snapshot(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "gpu": {
                "available": self.gpu.available,
                "name": self.gpu.name,
                "memory_total_mb": self.gpu.memory_total_mb,
                "memory_allocated_mb": self.gpu.memory_allocated_mb,
            },
            "image_model": {
                "name": self.image_model.name,
                "loaded": self.image_model.loaded,
                "development_model": self.image_model.development_model,
                "dtype": self.image_model.dtype,
                "acceleration": self.image_model.acceleration,
            },
            "kafka": {
                "enabled": self.kafka_enabled,
                "connected": self.kafka_connected,
                "security": self.kafka_security,
                "problem": self.kafka_problem,
                "assigned_partitions": [
                    {"topic": topic, "partition": partition}
                    for topic, partition in sorted(self.assigned)
                ],
                "paused_kinds": self.paused_kinds,
            },
            "voice": self._voice(),
            "queues": self.queues() if self.queues is not None else {},
            "schema_registry": None if self.schema_registry_url is None else {
                "url": self.schema_registry_url,
                "reachable": self.schema_registry_reachable,
            },
            "store": None if self.store_where is None else {
                "url": self.store_where,
                "reachable": self.store_reachable,
            },
        }
