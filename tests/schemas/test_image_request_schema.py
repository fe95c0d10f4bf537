"""The image fields added after the first release on the wire: the nested records agree
with their models, Apache Avro and the engine read each other's records with every new
field, and records of the schemas before them (``history/ImageRequested.v2.avsc``,
``history/GenerationCompleted.v1.avsc``) still read, with the new fields' defaults."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import schemas
from schemas import EventCodec
from schemas.events import (
    GeneratedImage,
    GenerationCompleted,
    ImageRequested,
    LoraWeight,
)
from tests.schemas.test_avro_interop import _apache, _apache_read, _apache_write
from tests.schemas.test_schema_parity import _check_record

AVRO_DIR = Path(schemas.__file__).with_name("avro")

REQUEST = ImageRequested(
    request_id="r", conversation_id="c", prompt="the same picture, but at the beach",
    character_lora_id="sarah_v1", lora_scale=0.75,
    loras=[LoraWeight(lora_id="beach_style", scale=0.5), LoraWeight(lora_id="red_dress")],
    num_images=4, output_format="webp", output_quality=80, init_image=b"\x89PNG\x00\xff" * 9,
    strength=0.6,
)
COMPLETED = GenerationCompleted(
    request_id="r", kind="image", image_id="i0", filename="i0.webp", url="/outputs/i0.webp",
    seed=40, images=[GeneratedImage(image_id=f"i{n}", filename=f"i{n}.webp",
                                    url=f"/outputs/i{n}.webp", seed=40 + n) for n in range(4)],
)


def _nested(schema_file: str, field: str) -> dict[str, Any]:
    record = json.loads((AVRO_DIR / schema_file).read_text("utf-8"))
    kind = next(f for f in record["fields"] if f["name"] == field)["type"]
    array = kind[1] if isinstance(kind, list) else kind
    return dict(array["items"])


def test_nested_records_agree_with_their_models() -> None:
    _check_record(LoraWeight, _nested("ImageRequested.avsc", "loras"))
    _check_record(GeneratedImage, _nested("GenerationCompleted.avsc", "images"))


@pytest.mark.parametrize("event", [REQUEST, COMPLETED], ids=["request", "completed"])
def test_apache_avro_and_the_engine_read_each_other(event: Any) -> None:
    codec = EventCodec()
    apache = _apache((AVRO_DIR / f"{type(event).__name__}.avsc").read_text("utf-8"))
    written = codec.encode(event, "avro")
    assert _apache_read(apache, written[10:]) == event.model_dump(mode="python")
    theirs = b"\xc3\x01" + apache.fingerprint() + _apache_write(apache, event.model_dump())
    assert codec.decode(theirs, None, type(event)) == event
    assert codec.decode(codec.encode(event, "json"), None, type(event)) == event


def test_json_carries_the_init_image_as_base64() -> None:
    text = json.loads(EventCodec().encode(REQUEST, "json"))
    assert text["init_image"] == "iVBORwD/" * 9
    assert text["loras"] == [{"lora_id": "beach_style", "scale": 0.5},
                             {"lora_id": "red_dress", "scale": 1.0}]


def _old_record(history_file: str, values: dict[str, Any]) -> bytes:
    text = (AVRO_DIR / "history" / history_file).read_text("utf-8")
    apache = _apache(text)
    record = {f["name"]: f.get("default") for f in json.loads(text)["fields"]}
    record.update({k: v for k, v in values.items() if k in record})
    return b"\xc3\x01" + apache.fingerprint() + _apache_write(apache, record)


def test_requests_written_before_these_fields_read_with_their_defaults() -> None:
    value = _old_record("ImageRequested.v2.avsc", {
        "request_id": "r", "conversation_id": "c", "prompt": "p", "priority": "background"})
    event = EventCodec().decode(value, "avro/binary", ImageRequested)
    assert event.priority == "background"
    assert (event.lora_scale, event.loras, event.num_images, event.output_format) == (
        None, [], None, None)
    assert event.init_image is None and event.init_image_url is None and event.strength is None


def test_completed_events_written_before_images_read_without_them() -> None:
    value = _old_record("GenerationCompleted.v1.avsc", {
        "request_id": "r", "kind": "image", "timestamp": "2024-01-01T00:00:00Z",
        "image_id": "i", "seed": 7})
    event = EventCodec().decode(value, "avro/binary", GenerationCompleted)
    assert event.image_id == "i" and event.images is None


def test_lora_events_written_before_their_location_read_without_it() -> None:
    value = _old_record("GenerationCompleted.v2.avsc", {
        "request_id": "r", "kind": "lora", "timestamp": "2024-01-01T00:00:00Z",
        "lora_id": "mia_v2"})
    event = EventCodec().decode(value, "avro/binary", GenerationCompleted)
    assert event.lora_id == "mia_v2" and event.lora_location is None
    located = event.model_copy(update={"lora_location": "s3://b/p/loras/mia_v2.json"})
    codec = EventCodec()
    assert codec.decode(codec.encode(located, "avro"), None, GenerationCompleted) == located
