"""The engine's Avro is the Apache Avro project's Avro: fingerprints, bodies and evolution are
checked against the reference implementation (``avro``) and the specification's algorithm."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import avro.io
import avro.schema
import pytest

import schemas
from schemas import (
    Event,
    EventCodec,
    GenerationCompleted,
    GenerationControl,
    ImageRequested,
    InlineImage,
    LoraTrainingRequested,
    UndecodableError,
    VoiceRequested,
    schema_fingerprint,
)

AVRO_DIR = Path(schemas.__file__).with_name("avro")
AVSC = sorted(AVRO_DIR.glob("*.avsc"))


def _rabin_table() -> list[int]:
    # CRC-64-AVRO exactly as the Avro specification ("Schema Fingerprints") writes it.
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (0xC15D213AA4D7A795 & -(fp & 1))
        table.append(fp)
    return table


_TABLE = _rabin_table()


def crc64_avro(data: bytes) -> int:
    fp = 0xC15D213AA4D7A795
    for byte in data:
        fp = (fp >> 8) ^ _TABLE[(fp ^ byte) & 0xFF]
    return fp


def _apache(text: str | dict[str, Any]) -> avro.schema.Schema:
    return avro.schema.parse(text if isinstance(text, str) else json.dumps(text))


def _apache_write(schema: avro.schema.Schema, record: dict[str, Any]) -> bytes:
    out = io.BytesIO()
    avro.io.DatumWriter(schema).write(record, avro.io.BinaryEncoder(out))
    return out.getvalue()


def _apache_read(schema: avro.schema.Schema, body: bytes) -> Any:
    return avro.io.DatumReader(schema, schema).read(avro.io.BinaryDecoder(io.BytesIO(body)))


@pytest.fixture(scope="module")
def codec() -> EventCodec:
    return EventCodec()


def test_crc64_avro_matches_known_values() -> None:
    # "null" is the Java implementation's test vector (a signed long); "int" is Apache avro's.
    assert crc64_avro(b'"null"') == 7195948357588979594
    assert crc64_avro(b'"int"').to_bytes(8, "little").hex() == "8f5c393f1ad57572"


@pytest.mark.parametrize("path", AVSC, ids=[p.stem for p in AVSC])
def test_fingerprint_matches_spec_and_apache_avro(codec: EventCodec, path: Path) -> None:
    apache = _apache(path.read_text("utf-8"))
    spec = crc64_avro(apache.canonical_form.encode()).to_bytes(8, "little")
    assert schema_fingerprint(json.loads(path.read_text("utf-8"))) == spec == apache.fingerprint()
    model: type[Event] = getattr(schemas, path.stem)
    value = codec.encode(_minimal(model), "avro")
    assert value[:2] == b"\xc3\x01" and value[2:10] == spec


def _minimal(model: type[Event]) -> Event:
    required: dict[str, Any] = {
        "request_id": "r", "conversation_id": "c", "prompt": "p", "text": "t",
        "character_id": "s", "trigger_word": "w", "kind": "image", "error_code": "INTERNAL",
        "message": "m", "retryable": False, "attempts": 1, "source_topic": "t",
        "source_partition": 0, "source_offset": 0, "step": 1, "total": 2, "action": "cancel",
    }  # fmt: skip
    return model.model_validate({k: v for k, v in required.items() if k in model.model_fields})


FULL: list[Event] = [
    ImageRequested(
        request_id="r", conversation_id="c", prompt="p ☀", width=64, height=128, seed=2**62,
        guidance_scale=3.5, optimize_prompt=False, created_at="2024-01-01T00:00:00Z",
    ),
    VoiceRequested(request_id="r", conversation_id="c", text="hi", stability=0.25,
                   priority="background", deadline="2024-01-01T00:00:05Z"),
    GenerationControl(action="cancel", request_id="r", conversation_id="c"),
    LoraTrainingRequested(
        request_id="r", character_id="s", trigger_word="w", image_urls=["u1", "u2"],
        images=[InlineImage(filename="a.png", data=b"\x00\xff" * 40)], learning_rate=1e-4,
    ),
    GenerationCompleted(
        request_id="r", kind="voice", audio_id="a", duration_seconds=1.25, model="eleven_v3",
        development_model=False,
    ),
]  # fmt: skip


@pytest.mark.parametrize("event", FULL, ids=[type(e).__name__ for e in FULL])
def test_apache_avro_reads_what_the_engine_writes(codec: EventCodec, event: Event) -> None:
    apache = _apache((AVRO_DIR / f"{type(event).__name__}.avsc").read_text("utf-8"))
    value = codec.encode(event, "avro")
    assert value[2:10] == apache.fingerprint()
    assert _apache_read(apache, value[10:]) == event.model_dump(mode="python")


@pytest.mark.parametrize("event", FULL, ids=[type(e).__name__ for e in FULL])
def test_engine_reads_what_apache_avro_writes(codec: EventCodec, event: Event) -> None:
    apache = _apache((AVRO_DIR / f"{type(event).__name__}.avsc").read_text("utf-8"))
    value = b"\xc3\x01" + apache.fingerprint() + _apache_write(apache, event.model_dump())
    assert codec.decode(value, None, type(event)) == event


def _without(name: str, *dropped: str) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((AVRO_DIR / f"{name}.avsc").read_text("utf-8"))
    schema["fields"] = [f for f in schema["fields"] if f["name"] not in dropped]
    return schema


def test_older_writer_schema_reads_with_current_defaults() -> None:
    # An earlier VoiceRequested, before model_id and inject_emotion were added.
    old = _without("VoiceRequested", "model_id", "inject_emotion", "priority", "deadline")
    apache = _apache(old)
    record = {"request_id": "r", "conversation_id": "c", "character_id": None, "text": "hi",
              "voice_id": "v", "stability": 0.5, "similarity_boost": None, "style": None,
              "created_at": None}  # fmt: skip
    value = b"\xc3\x01" + apache.fingerprint() + _apache_write(apache, record)

    with pytest.raises(UndecodableError, match="unknown Avro writer schema fingerprint"):
        EventCodec().decode_raw(value, None)

    codec = EventCodec(extra_writer_schemas=[old])
    name, raw = codec.decode_raw(value, "avro/binary")
    assert name == VoiceRequested.avro_name  # resolved to the current schema's fields
    assert raw["inject_emotion"] is True and raw["model_id"] is None
    event = codec.decode(value, None, VoiceRequested)
    assert event.voice_id == "v" and event.inject_emotion is True


@pytest.mark.parametrize("name", ["ImageRequested", "VoiceRequested"])
def test_requests_of_producers_before_priority_and_deadline_still_read(name: str) -> None:
    # schemas/avro/history/*.v1.avsc: what producers wrote before the scheduling fields
    old_text = (AVRO_DIR / "history" / f"{name}.v1.avsc").read_text("utf-8")
    apache = _apache(old_text)
    record = {f["name"]: f.get("default") for f in json.loads(old_text)["fields"]}
    required = {"request_id": "r", "conversation_id": "c", "prompt": "p", "text": "t"}
    record.update({k: v for k, v in required.items() if k in record})
    value = b"\xc3\x01" + apache.fingerprint() + _apache_write(apache, record)
    event = EventCodec().decode(value, "avro/binary", getattr(schemas, name))
    assert event.priority is None and event.deadline is None  # type: ignore[attr-defined]


def test_older_completed_event_without_provenance_fields() -> None:
    old = _without("GenerationCompleted", "model", "development_model")
    apache = _apache(old)
    event = GenerationCompleted(request_id="r", kind="image", image_id="i", seed=7)
    record = {
        k: v for k, v in event.model_dump().items() if k not in ("model", "development_model")
    }
    value = b"\xc3\x01" + apache.fingerprint() + _apache_write(apache, record)
    assert EventCodec(extra_writer_schemas=[old]).decode(value, None, GenerationCompleted) == event
