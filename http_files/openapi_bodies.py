"""HTTP bodies that no event model describes, as pydantic models for the OpenAPI document
only (the handlers build these bodies as dicts; the HTTP tests check every response they
get against the document, so a handler and its model here cannot drift apart unseen).

The engine's own types are reused where the handlers serialise them: the health parts
(:mod:`core.health`), the training status (:mod:`core.training.status`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from core.health import GpuInfo, ImageModelInfo, VoiceQuota

__all__ = [
    "AssignedPartition",
    "CancelAnswer",
    "EngineErrorBody",
    "FieldError",
    "FieldErrors",
    "HealthReport",
    "KafkaHealth",
    "LiveReport",
    "NotHeldBody",
    "ReadyReport",
    "SchemaRegistryHealth",
    "TrainingAccepted",
    "UnauthorizedBody",
    "VoiceHealth",
    "WorkerLiveness",
]


class _Body(BaseModel):
    model_config = ConfigDict(frozen=True)


class FieldError(_Body):
    """Where the problem is (``["body", field, ...]``, or ``["header", "content-type"]``),
    what it is, and its kind (``value_error``, ``json_invalid``, ``body_too_large``...)."""

    loc: list[str | int]
    msg: str
    type: str


class FieldErrors(_Body):
    """A request refused for its body, in the original (FastAPI) service's shape."""

    detail: list[FieldError]
    error_code: str


class EngineErrorBody(_Body):
    """A request that failed in the engine; ``retryable`` says whether the same request
    may succeed later (then a ``Retry-After`` header says when to try)."""

    error_code: str
    message: str
    retryable: bool


class NotHeldBody(_Body):
    """``DELETE /requests/{request_id}`` without a local match nor a conversation named."""

    error_code: str
    message: str


class CancelAnswer(_Body):
    """``cancelled`` (200) when this instance held the request and stopped it,
    ``cancel_requested`` (202) when only the broadcast on ``generation.control`` went out."""

    request_id: str
    status: Literal["cancelled", "cancel_requested"]
    cancelled_here: int
    broadcast: bool


class TrainingAccepted(_Body):
    """The original API's ``/train-lora`` response; ``lora_id`` only when ``completed``
    (the same images were trained before)."""

    training_id: str
    status: Literal["training_started", "completed"]
    character_id: str
    trigger_word: str
    estimated_time_minutes: int
    timestamp: str
    request_id: str
    lora_id: str | None = None


class AssignedPartition(_Body):
    topic: str
    partition: int


class KafkaHealth(_Body):
    """``security``: the protocol and SASL mechanism (``SASL_SSL (SCRAM-SHA-512 as
    engine)``), never a secret; ``problem``: why the broker refuses this instance
    (credentials, TLS) when that is known; ``paused_kinds``: kinds with a partition whose
    fetching is held back because the kind is full."""

    enabled: bool
    connected: bool
    security: str
    problem: str | None = None
    assigned_partitions: list[AssignedPartition]
    paused_kinds: list[str]


class VoiceHealth(_Body):
    """``quota`` only for a backend with an account (ElevenLabs)."""

    backend: str
    quota: VoiceQuota | None = None


class SchemaRegistryHealth(_Body):
    """SCHEMA_REGISTRY_URL (no credentials) and whether its last call was answered
    (``null`` before the first); records whose writer schema it must give wait while it
    is unreachable."""

    url: str
    reachable: bool | None


class StoreHealth(_Body):
    """STORAGE_URL (``s3://bucket/prefix``) and whether its last call was answered
    (``null`` before the first); while it fails, outputs of other instances, LoRAs and
    trainings that need it fail (retryable) and ``status`` is ``degraded``."""

    url: str
    reachable: bool | None


class HealthReport(_Body):
    """``GET /health``: 200 when ``ok``, 503 while ``starting`` or ``degraded``;
    ``queues`` counts waiting requests by kind and priority; ``schema_registry`` is
    ``null`` without SCHEMA_REGISTRY_URL, ``store`` without STORAGE_URL."""

    status: Literal["ok", "starting", "degraded"]
    gpu: GpuInfo
    image_model: ImageModelInfo
    kafka: KafkaHealth
    voice: VoiceHealth
    queues: dict[str, dict[str, int]]
    schema_registry: SchemaRegistryHealth | None = None
    store: StoreHealth | None = None


class WorkerLiveness(_Body):
    """The GPU worker thread: ``idle``, ``busy`` on one item for ``busy_seconds``,
    ``stuck`` (busy longer than LIVENESS_GPU_STUCK_SECONDS), ``stopped`` (on purpose),
    ``dead`` (its thread ended without a stop), ``none`` (no image model here)."""

    state: Literal["idle", "busy", "stuck", "stopped", "dead", "none"]
    busy_seconds: float | None


class LiveReport(_Body):
    """``GET /health/live``: 200 ``live``, 503 ``wedged`` (the GPU worker ``stuck`` or
    ``dead``); Kafka, the model and draining do not count."""

    status: Literal["live", "wedged"]
    gpu_worker: WorkerLiveness


class ReadyReport(_Body):
    """``GET /health/ready``: 200 ``ready``, 503 ``not_ready`` with its ``reasons``:
    ``starting`` (the model not loaded yet), ``kafka_unreachable``, ``draining`` (a stop
    was requested)."""

    status: Literal["ready", "not_ready"]
    reasons: list[Literal["starting", "kafka_unreachable", "draining"]]


class UnauthorizedBody(_Body):
    """401: no ``Authorization: Bearer <key>``, or a key that is not one of API_KEYS."""

    error_code: Literal["UNAUTHORIZED"]
    message: str
    retryable: bool
