"""The wire contract: Avro schemas (``schemas/avro/*.avsc``), the pydantic models that
validate them, the codec that turns records into events and back, and the error hierarchy
whose codes travel in ``generation.failed``. Knows nothing of Kafka, HTTP or the models."""

from schemas.codec import (
    AVRO_CONTENT_TYPE,
    JSON_CONTENT_TYPE,
    Encoding,
    EventCodec,
    schema_fingerprint,
)
from schemas.errors import (
    EngineError,
    ErrorCode,
    GenerationTimeoutError,
    InternalError,
    InvalidRequestError,
    OutOfMemoryError,
    QuotaExceededError,
    UndecodableError,
    UnknownLoraError,
    UpstreamRejectedError,
    UpstreamUnavailableError,
)
from schemas.events import (
    NAMESPACE,
    Event,
    EventKind,
    GenerationCompleted,
    GenerationFailed,
    GenerationProgress,
    ImageRequested,
    InlineImage,
    LoraTrainingRequested,
    VoiceRequested,
    utc_now_iso,
)

__all__ = [
    "AVRO_CONTENT_TYPE",
    "JSON_CONTENT_TYPE",
    "NAMESPACE",
    "Encoding",
    "EngineError",
    "ErrorCode",
    "Event",
    "EventCodec",
    "EventKind",
    "GenerationCompleted",
    "GenerationFailed",
    "GenerationProgress",
    "GenerationTimeoutError",
    "ImageRequested",
    "InlineImage",
    "InternalError",
    "InvalidRequestError",
    "LoraTrainingRequested",
    "OutOfMemoryError",
    "QuotaExceededError",
    "UndecodableError",
    "UnknownLoraError",
    "UpstreamRejectedError",
    "UpstreamUnavailableError",
    "VoiceRequested",
    "schema_fingerprint",
    "utc_now_iso",
]
