"""The events of the wire contract as pydantic models, one per ``.avsc`` in ``schemas/avro``.

Each model has the fields of its Avro schema (same names, same optionality, same defaults)
and names that schema in ``avro_name``. Validation is what the contract promises about a
field and nothing model-specific: sizes that must be multiples of 16, LoRA image counts and
the like are checked by ``core``, which knows the model and the settings.

Scalars are strict (``"1024"`` is not a width, ``1`` is not ``true``): a producer's type
error is reported, never silently corrected. Unknown fields are ignored, so a newer
producer's additions do not break this reader.
"""

from __future__ import annotations

import base64
import binascii
from datetime import UTC, datetime
from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer
from pydantic_core import PydanticCustomError

__all__ = [
    "NAMESPACE",
    "Event",
    "EventKind",
    "GeneratedImage",
    "GenerationCompleted",
    "GenerationControl",
    "GenerationFailed",
    "GenerationProgress",
    "ImageFormat",
    "ImageRequested",
    "InlineImage",
    "LoraTrainingRequested",
    "LoraWeight",
    "RequestPriority",
    "VoiceOutputFormat",
    "VoiceRequested",
    "WordTiming",
    "parse_instant",
    "utc_now_iso",
]

NAMESPACE = "ai.companion.multimodal"

EventKind = Literal["image", "voice", "lora"]

_SEED_MAX = 2**63 - 1  # Avro long; also what torch.Generator.manual_seed takes


def utc_now_iso() -> str:
    """Now, UTC, ISO-8601 with milliseconds and ``Z``: ``2024-01-01T00:00:00.000Z``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _not_blank(value: str) -> str:
    # Checked, not stripped: the value stays what the producer sent.
    if not value.strip():
        raise PydanticCustomError("blank", "must not be blank")
    return value


def _iso_datetime(value: str) -> str:
    try:
        datetime.fromisoformat(value)
    except ValueError:
        raise PydanticCustomError(
            "iso_datetime", "must be an ISO-8601 date-time, e.g. 2024-01-01T00:00:00Z"
        ) from None
    return value


def parse_instant(value: str) -> datetime:
    """An ISO-8601 date-time as an aware UTC ``datetime`` (no offset means UTC)."""
    parsed = datetime.fromisoformat(value)
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _bytes_from_wire(value: object) -> object:
    # Avro carries raw bytes; JSON can only carry text, so it carries standard base64.
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except binascii.Error:
            raise PydanticCustomError("base64", "must be standard base64") from None
    return value


def _bytes_to_json(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


NonBlank = Annotated[str, AfterValidator(_not_blank)]
RequestId = Annotated[str, Field(max_length=200), AfterValidator(_not_blank)]
IsoDateTime = Annotated[str, AfterValidator(_iso_datetime)]
RequestPriority = Literal["interactive", "background"]
Unit = Annotated[float, Field(ge=0.0, le=1.0)]
Seed = Annotated[int, Field(ge=0, le=_SEED_MAX)]
WireBytes = Annotated[
    bytes,
    BeforeValidator(_bytes_from_wire),
    PlainSerializer(_bytes_to_json, return_type=str, when_used="json"),
]


class _Record(BaseModel):
    # Strict scalars, unknown fields ignored (forward compatibility), immutable values.
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True, allow_inf_nan=False)


class Event(_Record):
    """Base of every top-level event; ``avro_name`` ties it to its ``.avsc``."""

    avro_name: ClassVar[str]
    """Full name of the Avro schema this event is written with."""


LoraScale = Annotated[float, Field(ge=0.0, le=2.0)]
ImageFormat = Literal["png", "jpeg", "webp"]
# ElevenLabs' output_format names (its OpenAPI document's enum), codec_samplerate[_bitrate]
VoiceOutputFormat = Literal[
    "mp3_22050_32", "mp3_44100_32", "mp3_44100_64", "mp3_44100_96", "mp3_44100_128",
    "mp3_44100_192", "pcm_8000", "pcm_16000", "pcm_22050", "pcm_24000", "pcm_44100",
    "pcm_48000", "ulaw_8000", "alaw_8000", "opus_48000_32", "opus_48000_64", "opus_48000_96",
    "opus_48000_128", "opus_48000_192",
]
_MAX_LISTED_LORAS = 16  # a bound for any reader; MAX_LORAS_PER_REQUEST is checked by core


class LoraWeight(_Record):
    """One LoRA stacked on the character's: a registered id and its strength."""

    lora_id: NonBlank
    scale: LoraScale = 1.0


class GeneratedImage(_Record):
    """One image of a request that made several (``num_images``)."""

    image_id: str
    filename: str
    url: str
    seed: Seed


class WordTiming(_Record):
    """When one word of the caller's text is spoken: ``text[char_start:char_end] == word``."""

    word: str
    start: Annotated[float, Field(ge=0.0)]
    end: Annotated[float, Field(ge=0.0)]
    char_start: Annotated[int, Field(ge=0)]
    char_end: Annotated[int, Field(ge=0)]


class ImageRequested(Event):
    """The original ``/generate/image`` request plus identity."""

    avro_name: ClassVar[str] = f"{NAMESPACE}.ImageRequested"

    request_id: RequestId
    conversation_id: NonBlank
    character_id: str | None = None
    prompt: NonBlank
    negative_prompt: str | None = None
    character_lora_id: str | None = None
    width: Annotated[int, Field(gt=0)] | None = None
    height: Annotated[int, Field(gt=0)] | None = None
    num_inference_steps: Annotated[int, Field(ge=1)] | None = None
    guidance_scale: Annotated[float, Field(ge=0.0)] | None = None
    seed: Seed | None = None
    optimize_prompt: bool = True
    created_at: IsoDateTime | None = None
    priority: RequestPriority | None = None
    deadline: IsoDateTime | None = None
    # --- issue 11: stacked LoRAs, several images, formats, image-to-image ---
    lora_scale: LoraScale | None = None
    loras: Annotated[list[LoraWeight], Field(max_length=_MAX_LISTED_LORAS)] = Field(
        default_factory=list)
    num_images: Annotated[int, Field(ge=1, le=4)] | None = None
    output_format: ImageFormat | None = None
    output_quality: Annotated[int, Field(ge=1, le=100)] | None = None
    init_image_url: Annotated[NonBlank, Field(max_length=2048)] | None = None
    init_image: Annotated[WireBytes, Field(min_length=1)] | None = None
    strength: Unit | None = None


class VoiceRequested(Event):
    """The original ``/generate/voice`` request plus identity."""

    avro_name: ClassVar[str] = f"{NAMESPACE}.VoiceRequested"

    request_id: RequestId
    conversation_id: NonBlank
    character_id: str | None = None
    text: NonBlank
    voice_id: str | None = None
    stability: Unit | None = None
    similarity_boost: Unit | None = None
    style: Unit | None = None
    model_id: str | None = None
    inject_emotion: bool = True
    created_at: IsoDateTime | None = None
    priority: RequestPriority | None = None
    deadline: IsoDateTime | None = None
    # ElevenLabs' range ("integer between 0 and 4294967295"); absent: derived from request_id
    seed: Annotated[int, Field(ge=0, le=4_294_967_295)] | None = None
    # absent: the engine's default (ELEVENLABS_OUTPUT_FORMAT)
    output_format: VoiceOutputFormat | None = None


class InlineImage(_Record):
    """A training image carried in the event; ``data`` is base64 in JSON, raw in Avro."""

    filename: NonBlank
    data: Annotated[WireBytes, Field(min_length=1)]


class LoraTrainingRequested(Event):
    """Train a character LoRA from ``image_urls`` and/or inline ``images``.

    How many images are enough is a setting (MIN/MAX_LORA_IMAGES), checked by ``core``.
    """

    avro_name: ClassVar[str] = f"{NAMESPACE}.LoraTrainingRequested"

    request_id: RequestId
    conversation_id: str | None = None
    character_id: NonBlank
    trigger_word: NonBlank
    image_urls: list[NonBlank] = Field(default_factory=list)
    images: list[InlineImage] = Field(default_factory=list)
    steps: Annotated[int, Field(ge=1)] | None = None
    learning_rate: Annotated[float, Field(gt=0.0)] | None = None
    resolution: Annotated[int, Field(gt=0)] | None = None
    created_at: IsoDateTime | None = None


class GenerationControl(Event):
    """Control of pending requests (topic ``generation.control``, key conversation_id).

    ``cancel`` with ``request_id`` withdraws that request; without it, every request of the
    conversation published before this record. Every engine instance acts on every record.
    """

    avro_name: ClassVar[str] = f"{NAMESPACE}.GenerationControl"

    action: Literal["cancel"]
    request_id: Annotated[str, Field(max_length=200)] | None = None
    # bounded: every instance remembers recent cancels (CANCEL_MEMORY_SECONDS)
    conversation_id: Annotated[NonBlank, Field(max_length=200)]
    created_at: IsoDateTime | None = None


class GenerationCompleted(Event):
    """A result, flat for every kind: the fields of the other kinds are ``None``."""

    avro_name: ClassVar[str] = f"{NAMESPACE}.GenerationCompleted"

    request_id: str
    conversation_id: str | None = None
    kind: EventKind
    timestamp: IsoDateTime = Field(default_factory=utc_now_iso)
    # image
    image_id: str | None = None
    filename: str | None = None
    prompt: str | None = None
    width: Annotated[int, Field(gt=0)] | None = None
    height: Annotated[int, Field(gt=0)] | None = None
    url: str | None = None
    seed: Seed | None = None
    # voice
    audio_id: str | None = None
    text: str | None = None
    enhanced_text: str | None = None
    voice_id: str | None = None
    duration_seconds: Annotated[float, Field(ge=0.0)] | None = None
    words: list[WordTiming] | None = None
    alignment_url: str | None = None
    # lora
    training_id: str | None = None
    character_id: str | None = None
    trigger_word: str | None = None
    lora_id: str | None = None
    lora_location: str | None = None  # the registration in the shared store, if any
    # provenance
    model: str | None = None
    development_model: bool | None = None
    # image, when the request made several (num_images): every image, the first included
    images: list[GeneratedImage] | None = None


class GenerationFailed(Event):
    """A request that failed, or a record that was no valid request (``request_id`` None).

    ``error_code`` is a plain string, not :class:`~schemas.errors.ErrorCode`, so that a
    reader built before a code was added still reads the event.
    """

    avro_name: ClassVar[str] = f"{NAMESPACE}.GenerationFailed"

    request_id: str | None = None
    conversation_id: str | None = None
    kind: EventKind | None = None
    error_code: NonBlank
    message: str
    retryable: bool
    attempts: Annotated[int, Field(ge=0)]
    source_topic: str
    source_partition: Annotated[int, Field(ge=0)]
    source_offset: Annotated[int, Field(ge=0)]
    timestamp: IsoDateTime = Field(default_factory=utc_now_iso)


class GenerationProgress(Event):
    """Progress of long work: ``step`` of ``total`` done, with the loss when training; for
    voice, once, the ``stream_url`` the audio plays from while it is being made."""

    avro_name: ClassVar[str] = f"{NAMESPACE}.GenerationProgress"

    request_id: str
    conversation_id: str | None = None
    kind: EventKind
    step: Annotated[int, Field(ge=0)]
    total: Annotated[int, Field(ge=0)]
    loss: float | None = None
    stream_url: str | None = None
    timestamp: IsoDateTime = Field(default_factory=utc_now_iso)
