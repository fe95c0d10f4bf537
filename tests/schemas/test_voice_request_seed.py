"""VoiceRequested's ``seed``: ElevenLabs' range, validated as the contract promises; records
of producers from before it (``history/VoiceRequested.v2.avsc``) still read, with no seed."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Literal

import avro.io
import avro.schema
import pytest

import schemas
from schemas import EventCodec, VoiceRequested
from schemas.errors import InvalidRequestError

AVRO_DIR = Path(schemas.__file__).with_name("avro")


def test_a_record_of_a_producer_before_seed_reads_without_one() -> None:
    old_text = (AVRO_DIR / "history" / "VoiceRequested.v2.avsc").read_text("utf-8")
    assert "seed" not in {f["name"] for f in json.loads(old_text)["fields"]}
    old = avro.schema.parse(old_text)
    record = {f["name"]: f.get("default") for f in json.loads(old_text)["fields"]}
    record.update({"request_id": "r", "conversation_id": "c", "text": "t",
                   "priority": "background"})
    out = io.BytesIO()
    avro.io.DatumWriter(old).write(record, avro.io.BinaryEncoder(out))
    event = EventCodec().decode(b"\xc3\x01" + old.fingerprint() + out.getvalue(),
                                "avro/binary", VoiceRequested)
    assert event.seed is None and event.priority == "background"


@pytest.mark.parametrize("encoding", ["avro", "json"])
def test_the_largest_seed_travels_both_encodings(encoding: Literal["avro", "json"]) -> None:
    codec = EventCodec()
    event = VoiceRequested(request_id="r", conversation_id="c", text="t", seed=4_294_967_295)
    assert codec.decode(codec.encode(event, encoding), None, VoiceRequested) == event


@pytest.mark.parametrize("seed", [-1, 4_294_967_296, "7", 1.0, True])
def test_a_seed_outside_elevenlabs_range_is_invalid_naming_it(seed: object) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        EventCodec().validate(VoiceRequested, {"request_id": "r", "conversation_id": "c",
                                               "text": "t", "seed": seed})
    assert caught.value.field == "seed"
