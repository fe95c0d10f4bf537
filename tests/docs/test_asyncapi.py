"""docs/asyncapi.yaml: valid by the official AsyncAPI parser (``tools/asyncapi``), every
contract topic a channel, and a real oracle: what the engine's codec writes fits it, and
the record check the integration tests run (:mod:`tests.support.asyncapi_check`) catches
events that do not; it describes the Schema Registry's wire format as the codec writes it."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import fastavro
import httpx
import pytest

from consumers.asyncapi_examples import EXAMPLES
from consumers.topics import CONTRACT_TOPICS
from schemas import events
from schemas.codec import EventCodec, schema_fingerprint
from schemas.registry import RegistryFraming
from tests.support.asyncapi_check import EventChecker, asyncapi
from tests.support.openapi_check import DOCS
from tests.support.schema_registry import SchemaRegistryServer

_TOOL = Path(__file__).resolve().parents[2] / "tools" / "asyncapi"
_REQUEST_ID = EXAMPLES["GenerationCompleted"]["request_id"]


def _official_parser() -> list[str]:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the official AsyncAPI parser cannot run")
    if not (_TOOL / "node_modules" / "@asyncapi" / "parser").is_dir():
        pytest.skip("the AsyncAPI parser is not installed: run `npm ci` in tools/asyncapi "
                    "(.ci/run does)")
    return [node, str(_TOOL / "validate.js")]


def test_the_official_parser_accepts_the_document() -> None:
    result = subprocess.run([*_official_parser(), str(DOCS / "asyncapi.yaml")],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid AsyncAPI 3.0.0 (7 channels, 14 messages)" in result.stdout


def test_the_official_parser_rejects_a_broken_document(tmp_path: Path) -> None:
    broken = (DOCS / "asyncapi.yaml").read_text("utf-8").replace("type: record", "type: rekord",
                                                                 1)
    (tmp_path / "broken.yaml").write_text(broken, "utf-8")
    result = subprocess.run([*_official_parser(), str(tmp_path / "broken.yaml")],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1, result.stdout
    assert " error " in result.stdout and "/payload" in result.stdout


def test_every_contract_topic_is_a_channel() -> None:
    channels = asyncapi()["channels"].values()
    assert sorted(c["address"] for c in channels) == sorted(CONTRACT_TOPICS)


_TOPICS = {"ImageRequested": "generation.requested.image",
           "VoiceRequested": "generation.requested.voice",
           "LoraTrainingRequested": "generation.requested.lora",
           "GenerationControl": "generation.control", "GenerationCompleted": "generation.completed",
           "GenerationFailed": "generation.failed", "GenerationProgress": "generation.progress"}


@pytest.mark.parametrize("encoding", ["json", "avro"])
@pytest.mark.parametrize("name", sorted(_TOPICS))
def test_what_the_codec_writes_fits_the_document(name: str, encoding: str) -> None:
    codec = EventCodec()
    event = getattr(events, name).model_validate(EXAMPLES[name])
    headers = {"content-type": codec.content_type(encoding).encode(),  # type: ignore[arg-type]
               "request_id": str(getattr(event, "request_id", "")).encode()}
    EventChecker("pre.").check(f"pre.{_TOPICS[name]}", b"conv-42", headers,
                               codec.encode(event, encoding))  # type: ignore[arg-type]


def _completed(**changes: Any) -> bytes:
    event = events.GenerationCompleted.model_validate(EXAMPLES["GenerationCompleted"])
    return json.dumps({**event.model_dump(mode="json"), **changes}).encode()


def _json_headers(**extra: bytes) -> dict[str, bytes]:
    return {"content-type": b"application/json", "request_id": _REQUEST_ID.encode(), **extra}


def _avro_with_another_schema() -> bytes:
    """A GenerationCompleted written with a schema that has one field more."""
    schema = json.loads((Path(events.__file__).parent / "avro" /
                         "GenerationCompleted.avsc").read_text("utf-8"))
    schema["fields"].append({"name": "undocumented", "type": "int", "default": 0})
    record = events.GenerationCompleted.model_validate(EXAMPLES["GenerationCompleted"])
    out = io.BytesIO(b"\xc3\x01" + schema_fingerprint(schema))
    fastavro.schemaless_writer(out, fastavro.parse_schema(schema, named_schemas={}),
                               {**record.model_dump(), "undocumented": 1})
    return out.getvalue()


@pytest.mark.parametrize(("topic", "key", "headers", "value", "words"), [
    ("generation.completed", b"c", _json_headers(), _completed(extra_field=1),
     "'extra_field' was unexpected"),
    ("generation.completed", b"c", _json_headers(), _completed(kind="video"),
     "at /kind"),
    ("generation.completed", b"c", _json_headers(),
     json.dumps({"request_id": _REQUEST_ID}).encode(), "'kind' is a required property"),
    ("generation.completed", b"c", {"request_id": b"r"}, _completed(),
     "'content-type' is a required property"),
    ("generation.completed", b"c", _json_headers(**{"x-secret": b"1"}), _completed(),
     "'x-secret' was unexpected"),
    ("generation.completed", b"c", _json_headers(traceparent=b"not-a-trace"), _completed(),
     "at /traceparent"),
    ("generation.completed", b"c", _json_headers(**{"content-type": b"text/plain"}),
     _completed(), "content-type 'text/plain' is not documented"),
    ("generation.completed", b"\xff\xfe", _json_headers(), _completed(), "key is not UTF-8"),
    ("generation.completed", b"c", {"content-type": b"avro/binary", "request_id": b"r"},
     _avro_with_another_schema(), "not written with the document's Avro schema"),
    ("generation.finished", b"c", _json_headers(), _completed(), "no channel"),
])
def test_an_event_that_does_not_fit_is_caught(topic: str, key: bytes,
                                              headers: dict[str, bytes], value: bytes,
                                              words: str) -> None:
    with pytest.raises(AssertionError, match="does not fit|not|no channel") as caught:
        EventChecker().check(topic, key, headers, value)
    assert words in str(caught.value)


def test_a_valid_trace_context_fits() -> None:
    headers = _json_headers(traceparent=b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                            tracestate=b"vendor=1")
    EventChecker().check("generation.completed", b"conv-42", headers, _completed())


async def test_the_document_describes_the_schema_registry_wire_format() -> None:
    """What a codec with a registry writes and reads, on the local registry, is what the
    document says of the registry's wire format."""
    event = events.GenerationCompleted.model_validate(EXAMPLES["GenerationCompleted"])
    server = SchemaRegistryServer()
    url = await server.start()
    try:
        async with httpx.AsyncClient(timeout=5.0) as http:
            framing = RegistryFraming(url, http)
            codec = EventCodec(framing=framing)
            topic = "pre.generation.completed"
            schema_id = await framing.register(topic, event.avro_name,
                                               codec.current_schema(event.avro_name))
            value = codec.encode(event, "avro", topic)
            reader = EventCodec(framing=RegistryFraming(url, http))
            await reader.resolve_writer(value)
            assert reader.decode(value, None, events.GenerationCompleted) == event  # sniffed
    finally:
        await server.stop()
    assert list(server.subjects) == ["pre.generation.completed-value"]
    assert value[:5] == b"\x00" + schema_id.to_bytes(4, "big")

    document = asyncapi()
    description = document["info"]["description"]
    assert "a zero byte (`00`), the 4-byte big-endian schema id" in description
    assert "under the subject `{topic}-value`, topic prefix included" in description
    assert "(`{KAFKA_TOPIC_PREFIX}generation.completed-value`" in description
    assert "`GET /schemas/{fingerprint}`" in description
    assert "sniffs the value (`C3 01` or `00`\n  Avro, `{` JSON)" in description
    sniffed = document["components"]["schemas"]["RequestHeadersAvro"]["properties"]
    assert "(`C3 01` or `00` Avro, `{` JSON)" in sniffed["content-type"]["description"]
    for name, message in document["components"]["messages"].items():
        if name.endswith("Avro"):
            assert "`00`, the 4-byte big-endian schema id" in message["description"], name
