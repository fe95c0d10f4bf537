"""Every event survives encode → decode in both encodings, with and without the header."""

from __future__ import annotations

import pytest

from schemas import (
    AVRO_CONTENT_TYPE,
    JSON_CONTENT_TYPE,
    Encoding,
    Event,
    EventCodec,
    GenerationCompleted,
    GenerationFailed,
    GenerationProgress,
    ImageRequested,
    InlineImage,
    LoraTrainingRequested,
    VoiceRequested,
)

SAMPLES: list[Event] = [
    ImageRequested(request_id="r-1", conversation_id="conv-1", prompt="a sunset"),
    ImageRequested(
        request_id="r-2",
        conversation_id="conv-1",
        character_id="sarah",
        prompt="sarah on a beach, ünïcödé ☀",
        negative_prompt="blurry",
        character_lora_id="sarah_v1",
        width=1024,
        height=768,
        num_inference_steps=30,
        guidance_scale=3.5,
        seed=2**63 - 1,
        optimize_prompt=False,
        created_at="2024-01-01T00:00:00Z",
    ),
    VoiceRequested(request_id="r-3", conversation_id="conv-2", text="Hello!"),
    VoiceRequested(
        request_id="r-4",
        conversation_id="conv-2",
        character_id="sarah",
        text="Hello, I'm Sarah!",
        voice_id="21m00Tcm4TlvDq8ikWAM",
        stability=0.5,
        similarity_boost=1,
        style=0.0,
        model_id="eleven_v3",
        inject_emotion=False,
        created_at="2024-01-01T00:00:00+02:00",
    ),
    LoraTrainingRequested(
        request_id="r-5",
        character_id="sarah",
        trigger_word="sarahx",
        image_urls=["https://example.com/1.png"],
        images=[InlineImage(filename="2.png", data=bytes(range(256)))],
        steps=500,
        learning_rate=1e-4,
        resolution=512,
    ),
    GenerationCompleted(
        request_id="r-1",
        conversation_id="conv-1",
        kind="image",
        image_id="550e8400",
        filename="550e8400.png",
        prompt="sarah, a sunset",
        width=1024,
        height=1024,
        url="/outputs/550e8400.png",
        seed=42,
        model="tiny-flux",
        development_model=True,
    ),
    GenerationCompleted(
        request_id="r-3",
        conversation_id="conv-2",
        kind="voice",
        audio_id="660e",
        filename="660e.mp3",
        text="Hello!",
        enhanced_text="[warmly] Hello!",
        voice_id="21m00Tcm4TlvDq8ikWAM",
        url="/outputs/660e.mp3",
        duration_seconds=3.5,
    ),
    GenerationCompleted(
        request_id="r-5",
        kind="lora",
        training_id="sarah_1234",
        character_id="sarah",
        trigger_word="sarahx",
        lora_id="sarah_v2",
    ),
    GenerationFailed(
        error_code="UNDECODABLE",
        message="record value is empty",
        retryable=False,
        attempts=1,
        source_topic="generation.requested.image",
        source_partition=3,
        source_offset=2**40,
    ),
    GenerationFailed(
        request_id="r-3",
        conversation_id="conv-2",
        kind="voice",
        error_code="UPSTREAM_UNAVAILABLE",
        message="ElevenLabs answered 503",
        retryable=True,
        attempts=4,
        source_topic="generation.requested.voice",
        source_partition=0,
        source_offset=0,
    ),
    GenerationProgress(request_id="r-5", kind="lora", step=10, total=500, loss=0.25),
    GenerationProgress(request_id="r-1", conversation_id="conv-1", kind="image", step=0, total=4),
]
IDS = [f"{type(e).__name__}-{i}" for i, e in enumerate(SAMPLES)]


@pytest.fixture(scope="module")
def codec() -> EventCodec:
    return EventCodec()


@pytest.mark.parametrize("encoding", ["avro", "json"])
@pytest.mark.parametrize("event", SAMPLES, ids=IDS)
def test_round_trip_with_header(codec: EventCodec, event: Event, encoding: Encoding) -> None:
    value = codec.encode(event, encoding)
    assert codec.decode(value, codec.content_type(encoding), type(event)) == event


@pytest.mark.parametrize("encoding", ["avro", "json"])
@pytest.mark.parametrize("event", SAMPLES, ids=IDS)
def test_round_trip_sniffed_without_header(
    codec: EventCodec, event: Event, encoding: Encoding
) -> None:
    assert codec.decode(codec.encode(event, encoding), None, type(event)) == event


def test_decode_raw_names_the_avro_schema_and_not_json(codec: EventCodec) -> None:
    event = SAMPLES[0]
    name, raw = codec.decode_raw(codec.encode(event, "avro"), AVRO_CONTENT_TYPE)
    assert name == "ai.companion.multimodal.ImageRequested" == ImageRequested.avro_name
    assert raw["prompt"] == "a sunset"
    name, raw = codec.decode_raw(codec.encode(event, "json"), JSON_CONTENT_TYPE)
    assert name is None and raw["prompt"] == "a sunset"


def test_avro_value_is_single_object_encoding(codec: EventCodec) -> None:
    value = codec.encode(SAMPLES[0], "avro")
    assert value[:2] == b"\xc3\x01" and len(value) > 10


def test_json_is_compact_utf8_with_nulls_and_base64_bytes(codec: EventCodec) -> None:
    text = codec.encode(SAMPLES[1], "json").decode("utf-8")
    assert '"prompt":"sarah on a beach, ünïcödé ☀"' in text and ": " not in text
    assert '"created_at":"2024-01-01T00:00:00Z"' in text
    assert '"seed":9223372036854775807' in text
    assert '"character_id":null' in codec.encode(SAMPLES[0], "json").decode()
    lora = codec.encode(SAMPLES[4], "json").decode()
    assert '"data":"AAECAwQFBgcICQ' in lora  # standard base64 of bytes 0, 1, 2, ...


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json; charset=utf-8",
        "APPLICATION/JSON",
        "application/vnd.companion.event+json",
        b"application/json",
        "",
    ],
)
def test_json_content_type_variants(codec: EventCodec, content_type: str | bytes) -> None:
    value = b'  \n{"request_id": "r", "conversation_id": "c", "text": "hi"}'
    event = codec.decode(value, content_type, VoiceRequested)
    assert event.text == "hi" and event.inject_emotion is True


def test_json_defaults_fill_absent_fields(codec: EventCodec) -> None:
    value = b'{"request_id": "r", "conversation_id": "c", "prompt": "p", "future": 1}'
    event = codec.decode(value, None, ImageRequested)
    assert event.optimize_prompt is True and event.seed is None


def test_avro_content_type_with_parameters(codec: EventCodec) -> None:
    value = codec.encode(SAMPLES[2], "avro")
    assert codec.decode(value, "Avro/Binary; v=1", VoiceRequested) == SAMPLES[2]


def test_content_type_names() -> None:
    assert EventCodec.content_type("avro") == "avro/binary"
    assert EventCodec.content_type("json") == "application/json"
    with pytest.raises(ValueError, match="unknown encoding"):
        EventCodec.content_type("xml")  # type: ignore[arg-type]


def test_timestamp_defaults_to_now_utc_with_z() -> None:
    stamp = GenerationProgress(request_id="r", kind="image", step=1, total=2).timestamp
    assert stamp.endswith("Z") and stamp[:2] == "20" and "T" in stamp
