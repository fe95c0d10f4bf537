"""The image request's newer fields, checked before any work: each bad value is an error
naming its field, whether the event model (the contract's ranges) or the image core
(settings, combinations) refuses it; defaults and the image-to-image size."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from core.image.job import denoising_steps
from core.image.params import ImageLimits, resolve_params, size_for_init
from schemas.codec import EventCodec
from schemas.errors import InvalidRequestError
from schemas.events import ImageRequested

LIMITS = ImageLimits(max_image_size=1024, default_size=512, default_steps=28, max_loras=3)
PNG = "iVBORw0KGgo="  # base64 of a PNG signature: enough for the event model

# every invalid value of a new field, and the field the error must name
INVALID_BY_THE_CONTRACT: list[tuple[dict[str, Any], str]] = [
    ({"lora_scale": -0.1}, "lora_scale"),
    ({"lora_scale": 2.5}, "lora_scale"),
    ({"lora_scale": "1"}, "lora_scale"),
    ({"loras": "sarah_v1"}, "loras"),
    ({"loras": [{"scale": 0.5}]}, "loras.0.lora_id"),
    ({"loras": [{"lora_id": " "}]}, "loras.0.lora_id"),
    ({"loras": [{"lora_id": "a", "scale": 3}]}, "loras.0.scale"),
    ({"loras": [{"lora_id": f"l{i}"} for i in range(17)]}, "loras"),
    ({"num_images": 0}, "num_images"),
    ({"num_images": 5}, "num_images"),
    ({"num_images": 2.0}, "num_images"),
    ({"output_format": "jpg"}, "output_format"),
    ({"output_format": "gif"}, "output_format"),
    ({"output_quality": 0}, "output_quality"),
    ({"output_quality": 101}, "output_quality"),
    ({"init_image_url": ""}, "init_image_url"),
    ({"init_image_url": "http://x/" + "a" * 2100}, "init_image_url"),
    ({"init_image": "not base64!"}, "init_image"),
    ({"init_image": ""}, "init_image"),
    ({"strength": 1.5}, "strength"),
    ({"strength": -0.5}, "strength"),
]
INVALID_FOR_THE_ENGINE: list[tuple[dict[str, Any], str]] = [
    ({"character_lora_id": "sarah_v1", "loras": [{"lora_id": "a"}, {"lora_id": "b"},
                                                  {"lora_id": "c"}]}, "loras"),
    ({"loras": [{"lora_id": "a"}, {"lora_id": "a", "scale": 0.5}]}, "loras.1.lora_id"),
    ({"character_lora_id": "a", "loras": [{"lora_id": "a"}]}, "loras.0.lora_id"),
    ({"init_image": PNG, "init_image_url": "http://images.example/a.png"}, "init_image"),
    ({"init_image_url": "ftp://images.example/a.png"}, "init_image_url"),
    ({"init_image_url": "file:///etc/passwd"}, "init_image_url"),
    ({"init_image_url": "http://"}, "init_image_url"),
    ({"init_image": PNG, "strength": 0.0}, "strength"),
    ({"init_image": PNG, "strength": 1e-18, "num_inference_steps": 28}, "strength"),
]


def body(**fields: Any) -> dict[str, Any]:
    return {"request_id": "r-1", "conversation_id": "c", "prompt": "a cat", **fields}


@pytest.mark.parametrize(("fields", "field"), INVALID_BY_THE_CONTRACT,
                         ids=[f"{f}-{i}" for i, (_, f) in enumerate(INVALID_BY_THE_CONTRACT)])
def test_the_event_model_refuses_values_outside_the_contract(
    fields: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        EventCodec().validate(ImageRequested, body(**fields))
    assert field in [error["field"] for error in raised.value.errors], raised.value.errors


@pytest.mark.parametrize(("fields", "field"), INVALID_FOR_THE_ENGINE,
                         ids=[f"{f}-{i}" for i, (_, f) in enumerate(INVALID_FOR_THE_ENGINE)])
def test_the_engine_refuses_what_its_settings_or_the_model_cannot_do(
    fields: dict[str, Any], field: str
) -> None:
    event = EventCodec().validate(ImageRequested, body(**fields))
    with pytest.raises(InvalidRequestError) as raised:
        resolve_params(event, LIMITS)
    assert raised.value.field == field and field in raised.value.message


def test_num_images_is_at_most_max_batch_size() -> None:
    # a request's images are one batch: more than MAX_BATCH_SIZE is refused, not split
    limits = replace(LIMITS, max_batch_size=2)
    assert resolve_params(EventCodec().validate(ImageRequested, body(num_images=2)),
                          limits).num_images == 2
    with pytest.raises(InvalidRequestError) as raised:
        resolve_params(EventCodec().validate(ImageRequested, body(num_images=3)), limits)
    assert raised.value.field == "num_images"
    assert "MAX_BATCH_SIZE=2" in raised.value.message


def test_defaults_of_the_new_fields() -> None:
    params = resolve_params(EventCodec().validate(ImageRequested, body()), LIMITS)
    assert (params.lora_scale, params.loras, params.num_images) == (1.0, (), 1)
    assert (params.output_format, params.output_quality) == ("png", 90)
    assert not params.image_to_image
    inline = resolve_params(EventCodec().validate(ImageRequested, body(init_image=PNG)), LIMITS)
    assert inline.image_to_image and inline.strength == 0.8
    assert inline.init_image == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("given", "init", "expected"), [
    ({}, (100, 70), (96, 64)),             # rounded to multiples of 16
    ({}, (4000, 3000), (1024, 768)),       # scaled down to MAX_IMAGE_SIZE
    ({}, (30, 40), (64, 80)),              # scaled up to 64 on its short side
    ({"width": 256}, (400, 200), (256, 128)),  # a side given: the other keeps the aspect
    ({"width": 256, "height": 512}, (400, 200), (256, 512)),
])
def test_image_to_image_size_defaults_to_the_init_image(
    given: dict[str, int], init: tuple[int, int], expected: tuple[int, int]
) -> None:
    event = EventCodec().validate(ImageRequested, body(init_image=PNG, **given))
    params = size_for_init(resolve_params(event, LIMITS), init, LIMITS)
    assert (params.width, params.height) == expected


@pytest.mark.parametrize(("given", "init", "field"), [
    ({"width": 1024}, (1000, 4000), "height"),  # 4096 tall: never clamped to 1024
    ({"height": 1024}, (4000, 1000), "width"),  # 4096 wide
    ({"width": 64}, (4000, 1000), "height"),    # 16 high: under 64
    ({}, (10_000, 10), "height"),               # no size keeps that aspect within limits
])
def test_a_derived_side_out_of_range_is_refused_naming_it(
    given: dict[str, int], init: tuple[int, int], field: str
) -> None:
    event = EventCodec().validate(ImageRequested, body(init_image=PNG, **given))
    with pytest.raises(InvalidRequestError) as raised:
        size_for_init(resolve_params(event, LIMITS), init, LIMITS)
    assert raised.value.field == field and "MAX_IMAGE_SIZE=1024" in raised.value.message
    assert f"{init[0]}x{init[1]}" in raised.value.message


def test_rounding_alone_never_takes_a_side_past_max_image_size() -> None:
    limits = replace(LIMITS, max_image_size=1020)  # not a multiple of 16
    event = EventCodec().validate(ImageRequested, body(init_image=PNG))
    params = size_for_init(resolve_params(event, limits), (1020, 510), limits)
    assert (params.width, params.height) == (1008, 512)  # 1020 would round to 1024


@pytest.mark.parametrize(("steps", "strength", "expected"), [
    (28, 1.0, 28), (28, 0.8, 23), (20, 0.05, 1), (4, 0.5, 2), (28, 0.0, 0)])
def test_denoising_steps_follow_diffusers(steps: int, strength: float, expected: int) -> None:
    assert denoising_steps(steps, strength) == expected
