"""Every event schema stays compatible with each of its earlier versions
(``schemas/avro/history/{Name}.v{n}.avsc``), both ways, by Avro schema resolution: records
of an old writer read with the current schema (backward), and records of the current writer
read with an old one (forward), so neither producers nor consumers must deploy first.

Two oracles: Apache Avro's schema-level checker (``avro.compatibility``, what Schema
Registries run), whose failures are reported with the field's dotted name, and fastavro's
reader resolving generated records of the writer schema with the reader schema."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import avro.schema
import fastavro
import pytest
from avro.compatibility import ReaderWriterCompatibilityChecker, SchemaCompatibilityType
from fastavro.read import SchemaResolutionError
from fastavro.utils import generate_many

import schemas

AVRO_DIR = Path(schemas.__file__).with_name("avro")
_RECORDS_PER_PAIR = 25


def _versions(avro_dir: Path) -> list[tuple[Path, Path]]:
    """(current schema, one of its earlier versions) for every file in ``history/``."""
    pairs = []
    for old in sorted((avro_dir / "history").glob("*.avsc")):
        name = old.name.split(".", 1)[0]
        pairs.append((avro_dir / f"{name}.avsc", old))
    return pairs


def _load(path: Path) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(path.read_text("utf-8"))
    return schema


def _field_path(reader: Any, location: str) -> str:
    """``/fields/3/type/1/items/fields/0`` in ``reader`` as the dotted field names
    (``images.width``), so that a failure says which field, not which index."""
    names: list[str] = []
    node = reader
    tokens = [t for t in location.split("/") if t]
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token == "fields" and i + 1 < len(tokens) and isinstance(node, dict):
            field = node["fields"][int(tokens[i + 1])]
            names.append(field["name"])
            node = field
            i += 2
            continue
        if token in ("type", "items", "values") and isinstance(node, dict):
            node = node.get(token)
        elif token.isdigit() and isinstance(node, list):
            node = node[int(token)]
        i += 1
    return ".".join(names) or "(the record)"


def _schema_problems(reader: dict[str, Any], writer: dict[str, Any]) -> list[str]:
    result = ReaderWriterCompatibilityChecker().get_compatibility(
        avro.schema.parse(json.dumps(reader)), avro.schema.parse(json.dumps(writer)))
    if result.compatibility is SchemaCompatibilityType.compatible:
        return []
    # the checker keeps where (a JSON pointer into the reader) and what apart, as sets
    fields = sorted({_field_path(reader, loc) for loc in result.locations if loc != "/"})
    kinds = sorted({kind.name for kind in result.incompatibilities})
    where = ", ".join(fields) or "(the record)"
    return [f"{where}: {', '.join(kinds)} ({'; '.join(sorted(result.messages))})"]


def _resolution_problems(reader: dict[str, Any], writer: dict[str, Any]) -> list[str]:
    parsed_writer = fastavro.parse_schema(writer, named_schemas={})
    parsed_reader = fastavro.parse_schema(reader, named_schemas={})
    for record in generate_many(parsed_writer, _RECORDS_PER_PAIR):
        body = _write(parsed_writer, record)
        try:
            fastavro.schemaless_reader(body, parsed_writer, parsed_reader)
        except (SchemaResolutionError, ValueError, EOFError) as exc:  # its words name the field
            return [f"{type(exc).__name__}: {exc}"]
    return []


def _write(schema: Any, record: Any) -> io.BytesIO:
    out = io.BytesIO()
    fastavro.schemaless_writer(out, schema, record)
    out.seek(0)
    return out


def _problems(new: Path, old: Path) -> list[str]:
    """What breaks between ``new`` and its earlier version ``old``, each line saying the
    direction and the field."""
    new_schema, old_schema = _load(new), _load(old)
    problems = []
    for direction, reader, writer in (
            (f"{old.name} writer -> {new.name} reader", new_schema, old_schema),
            (f"{new.name} writer -> {old.name} reader", old_schema, new_schema)):
        found = _schema_problems(reader, writer) or _resolution_problems(reader, writer)
        problems += [f"{direction}: {p}" for p in found]
    return problems


PAIRS = _versions(AVRO_DIR)


def test_every_earlier_version_has_a_current_schema() -> None:
    assert PAIRS, "schemas/avro/history/ is empty"
    assert [old.name for new, old in PAIRS if not new.exists()] == []


@pytest.mark.parametrize(("new", "old"), PAIRS, ids=[old.stem for _, old in PAIRS])
def test_current_schema_reads_and_is_read_by_its_earlier_version(new: Path, old: Path) -> None:
    problems = _problems(new, old)
    assert problems == [], "\n".join(problems)


def _copy_with(tmp_path: Path, name: str, field: dict[str, Any]) -> Path:
    copy = tmp_path / "avro"
    shutil.copytree(AVRO_DIR, copy)
    schema = _load(copy / f"{name}.avsc")
    schema["fields"].append(field)
    (copy / f"{name}.avsc").write_text(json.dumps(schema, indent=2), "utf-8")
    return copy


def test_a_required_field_added_without_a_default_is_caught_and_named(tmp_path: Path) -> None:
    copy = _copy_with(tmp_path, "VoiceRequested", {"name": "mood", "type": "string"})
    problems = [p for new, old in _versions(copy) for p in _problems(new, old)]
    # old producers' records lack it and nothing fills it in: backward compatibility breaks,
    # for every earlier version, and the message names the field
    backward = [p for p in problems if "writer -> VoiceRequested.avsc reader" in p]
    assert len(backward) == len(list((copy / "history").glob("VoiceRequested.v*.avsc")))
    assert all("mood" in p for p in backward), problems
    assert not [p for p in problems if "VoiceRequested" not in p]


def test_a_field_whose_type_changes_is_caught_and_named(tmp_path: Path) -> None:
    copy = tmp_path / "avro"
    shutil.copytree(AVRO_DIR, copy)
    schema = _load(copy / "GenerationProgress.avsc")
    for field in schema["fields"]:
        if field["name"] == "step":
            field["type"] = "string"
    (copy / "GenerationProgress.avsc").write_text(json.dumps(schema), "utf-8")
    problems = _problems(copy / "GenerationProgress.avsc",
                         copy / "history" / "GenerationProgress.v1.avsc")
    assert len(problems) == 2, problems  # both ways
    assert all(": step: " in p for p in problems), problems


def test_an_optional_field_with_a_default_is_allowed(tmp_path: Path) -> None:
    copy = _copy_with(tmp_path, "VoiceRequested",
                      {"name": "mood", "type": ["null", "string"], "default": None})
    assert [p for new, old in _versions(copy) for p in _problems(new, old)] == []
