"""Decoded but invalid → InvalidRequestError naming the field; nothing is silently corrected."""

from __future__ import annotations

import json
from typing import Any

import pytest

from schemas import (
    EventCodec,
    GenerationFailed,
    ImageRequested,
    InvalidRequestError,
    LoraTrainingRequested,
    VoiceRequested,
)
from schemas.errors import ErrorCode

IMAGE = {"request_id": "r", "conversation_id": "c", "prompt": "p"}
VOICE = {"request_id": "r", "conversation_id": "c", "text": "hi"}
LORA = {"request_id": "r", "character_id": "s", "trigger_word": "t"}


@pytest.fixture(scope="module")
def codec() -> EventCodec:
    return EventCodec()


def _invalid(codec: EventCodec, model: Any, raw: dict[str, Any]) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        codec.decode(json.dumps(raw).encode(), "application/json", model)
    assert info.value.code is ErrorCode.INVALID_REQUEST and not info.value.retryable
    return info.value


def test_missing_field_is_named(codec: EventCodec) -> None:
    error = _invalid(codec, VoiceRequested, {"request_id": "r", "conversation_id": "c"})
    assert error.field == "text"
    assert error.message == "text: Field required"
    assert error.errors == [{"field": "text", "message": "Field required"}]


def test_every_error_is_listed_first_field_first(codec: EventCodec) -> None:
    error = _invalid(codec, ImageRequested, {"prompt": "p", "width": -1})
    assert error.field == "request_id"
    assert [e["field"] for e in error.errors] == ["request_id", "conversation_id", "width"]
    assert "width: Input should be greater than 0" in error.message


@pytest.mark.parametrize(
    ("model", "raw", "field"),
    [
        (ImageRequested, {**IMAGE, "prompt": "  \n"}, "prompt"),
        (ImageRequested, {**IMAGE, "request_id": ""}, "request_id"),
        (ImageRequested, {**IMAGE, "request_id": "x" * 201}, "request_id"),
        (ImageRequested, {**IMAGE, "conversation_id": " "}, "conversation_id"),
        (ImageRequested, {**IMAGE, "width": 0}, "width"),
        (ImageRequested, {**IMAGE, "height": "1024"}, "height"),  # strict: no coercion
        (ImageRequested, {**IMAGE, "width": 512.0}, "width"),
        (ImageRequested, {**IMAGE, "num_inference_steps": 0}, "num_inference_steps"),
        (ImageRequested, {**IMAGE, "guidance_scale": -0.5}, "guidance_scale"),
        (ImageRequested, {**IMAGE, "seed": -1}, "seed"),
        (ImageRequested, {**IMAGE, "seed": 2**63}, "seed"),
        (ImageRequested, {**IMAGE, "optimize_prompt": "yes"}, "optimize_prompt"),
        (ImageRequested, {**IMAGE, "optimize_prompt": 1}, "optimize_prompt"),
        (ImageRequested, {**IMAGE, "created_at": "yesterday"}, "created_at"),
        (VoiceRequested, {**VOICE, "text": ""}, "text"),
        (VoiceRequested, {**VOICE, "stability": 1.01}, "stability"),
        (VoiceRequested, {**VOICE, "similarity_boost": -0.1}, "similarity_boost"),
        (VoiceRequested, {**VOICE, "style": 2}, "style"),
        (LoraTrainingRequested, {**LORA, "trigger_word": ""}, "trigger_word"),
        (LoraTrainingRequested, {**LORA, "image_urls": ["ok", " "]}, "image_urls.1"),
        (LoraTrainingRequested, {**LORA, "images": [{"filename": "a.png"}]}, "images.0.data"),
        (
            LoraTrainingRequested,
            {**LORA, "images": [{"filename": "a.png", "data": "not base64!"}]},
            "images.0.data",
        ),
        (LoraTrainingRequested, {**LORA, "learning_rate": 0}, "learning_rate"),
        (LoraTrainingRequested, {**LORA, "steps": 0}, "steps"),
    ],
)
def test_invalid_field(codec: EventCodec, model: Any, raw: dict[str, Any], field: str) -> None:
    assert _invalid(codec, model, raw).field == field


def test_valid_edges(codec: EventCodec) -> None:
    raw = {**VOICE, "stability": 0, "similarity_boost": 1, "style": 0.5}
    voice = codec.validate(VoiceRequested, raw)
    assert voice.stability == 0.0 and isinstance(voice.stability, float)
    image = codec.validate(ImageRequested, {**IMAGE, "seed": 0, "request_id": "x" * 200})
    assert image.seed == 0
    # Checked, not stripped: the value is what the producer sent.
    assert codec.validate(ImageRequested, {**IMAGE, "prompt": " p "}).prompt == " p "


def test_nan_is_rejected_from_avro_too(codec: EventCodec) -> None:
    with pytest.raises(InvalidRequestError) as info:
        codec.validate(ImageRequested, {**IMAGE, "guidance_scale": float("nan")})
    assert info.value.field == "guidance_scale"


def test_schema_name_must_match_model(codec: EventCodec) -> None:
    value = codec.encode(ImageRequested.model_validate(IMAGE), "avro")
    with pytest.raises(InvalidRequestError) as info:
        codec.decode(value, None, VoiceRequested)
    assert info.value.field is None
    assert info.value.message == (
        "expected ai.companion.multimodal.VoiceRequested, got ai.companion.multimodal.ImageRequested"
    )


def test_unknown_error_codes_are_read(codec: EventCodec) -> None:
    # A newer engine may add codes; an older reader must still read its events.
    raw = {
        "error_code": "SOMETHING_NEW",
        "message": "m",
        "retryable": False,
        "attempts": 1,
        "source_topic": "t",
        "source_partition": 0,
        "source_offset": 0,
    }
    assert codec.validate(GenerationFailed, raw).error_code == "SOMETHING_NEW"


def test_many_errors_keep_the_message_short(codec: EventCodec) -> None:
    error = _invalid(codec, LoraTrainingRequested, {**LORA, "image_urls": [""] * 50})
    assert len(error.errors) == 50
    assert error.message.endswith("; and 40 more")


@pytest.mark.parametrize(("model", "raw", "field"), [
    (VoiceRequested, {**VOICE, "text": "hi \ud800"}, "text"),
    (VoiceRequested, {**VOICE, "conversation_id": "c\udfff"}, "conversation_id"),
    (ImageRequested, {**IMAGE, "loras": [{"lora_id": "\ud800x", "scale": 1.0}]},
     "loras.0.lora_id"),
    (LoraTrainingRequested, {**LORA, "trigger_word": "\udc00"}, "trigger_word"),
])
def test_lone_surrogates_are_refused_naming_the_field(codec: EventCodec, model: Any,
                                                       raw: dict[str, Any], field: str) -> None:
    # JSON may escape a lone surrogate (json.dumps writes "\ud800"); the string it decodes
    # to cannot be written to any event, header or log as UTF-8, so it must never be
    # accepted and echoed back
    assert b"\\ud" in json.dumps(raw).encode()
    error = _invalid(codec, model, raw)
    assert error.field == field
    assert "lone surrogate" in error.message


def test_surrogate_pairs_are_text(codec: EventCodec) -> None:
    raw = {**VOICE, "text": "smile \U0001F600"}
    assert "\\ud83d\\ude00" in json.dumps(raw)  # escaped as a pair
    event = codec.decode(json.dumps(raw).encode(), "application/json", VoiceRequested)
    assert event.text == "smile \U0001F600"
