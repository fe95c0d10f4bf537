"""The ``.avsc`` files and the pydantic models describe the same events, field for field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

import schemas
from schemas import (
    NAMESPACE,
    Event,
    GenerationCompleted,
    GenerationControl,
    GenerationFailed,
    GenerationProgress,
    ImageRequested,
    InlineImage,
    LoraTrainingRequested,
    VoiceRequested,
)

AVRO_DIR = Path(schemas.__file__).with_name("avro")
MODELS: list[type[Event]] = [
    ImageRequested,
    VoiceRequested,
    LoraTrainingRequested,
    GenerationCompleted,
    GenerationFailed,
    GenerationProgress,
    GenerationControl,
]


def test_one_schema_file_per_event() -> None:
    assert sorted(p.stem for p in AVRO_DIR.glob("*.avsc")) == sorted(m.__name__ for m in MODELS)


def _check_record(model: type[BaseModel], record: dict[str, Any]) -> None:
    fields = record["fields"]
    assert [f["name"] for f in fields] == list(model.model_fields), model.__name__
    for field in fields:
        info = model.model_fields[field["name"]]
        nullable = isinstance(field["type"], list) and field["type"][0] == "null"
        where = f"{model.__name__}.{field['name']}"
        if info.is_required():
            assert "default" not in field and not nullable, where
        elif info.default_factory is not None and field["name"] != "timestamp":
            assert field["default"] == info.default_factory(), where  # type: ignore[call-arg]
        elif info.default is not PydanticUndefined:
            assert field.get("default", "absent") == info.default, where
        # timestamp: required on the wire, filled in by the model when it is built


@pytest.mark.parametrize("model", MODELS, ids=[m.__name__ for m in MODELS])
def test_model_and_schema_agree(model: type[Event]) -> None:
    record = json.loads((AVRO_DIR / f"{model.__name__}.avsc").read_text("utf-8"))
    assert f"{record['namespace']}.{record['name']}" == model.avro_name
    assert record["namespace"] == NAMESPACE
    _check_record(model, record)


def test_inline_image_agrees() -> None:
    record = json.loads((AVRO_DIR / "LoraTrainingRequested.avsc").read_text("utf-8"))
    images = next(f for f in record["fields"] if f["name"] == "images")
    _check_record(InlineImage, images["type"]["items"])
