"""The AsyncAPI 3.0 document of the engine's topics, built from the code: the contract's
topic names (:data:`consumers.topics.CONTRACT_TOPICS`), the pydantic events (JSON
Schema), the ``.avsc`` files (Avro), the error codes and the Kafka defaults of
:class:`core.settings.Settings`. ``multimodal-engine docs`` writes it to
``docs/asyncapi.yaml``; the same code always gives the same document.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

from consumers.asyncapi_examples import EXAMPLES
from consumers.topics import CONTRACT_TOPICS
from core.settings import Settings
from core.version import engine_version
from schemas.codec import AVRO_CONTENT_TYPE, JSON_CONTENT_TYPE, Encoding
from schemas.events import (
    Event,
    GenerationCompleted,
    GenerationControl,
    GenerationFailed,
    GenerationProgress,
    ImageRequested,
    LoraTrainingRequested,
    VoiceRequested,
)
from schemas.jsonschema import Mode, component_schemas, error_code_schema

__all__ = ["AVRO_SCHEMA_FORMAT", "TRACEPARENT_PATTERN", "build_asyncapi", "message_id"]

AVRO_SCHEMA_FORMAT = "application/vnd.apache.avro;version=1.9.0"
TRACEPARENT_PATTERN = "^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"
_KAFKA_BINDING = "0.5.0"

Action = Literal["receive", "send"]


@dataclass(frozen=True)
class _Channel:
    """A contract topic: its event, what the engine does there, what its key is
    (``key_utf8``: always UTF-8 text; else passed on byte for byte)."""

    address: str
    model: type[Event]
    actions: tuple[Action, ...]
    key: str
    summary: str
    key_utf8: bool = True

    @property
    def inbound(self) -> bool:
        return "receive" in self.actions


_CHANNELS = (
    _Channel("generation.requested.image", ImageRequested, ("receive",), "conversation_id",
             "Image requests (FLUX.1), answered on generation.completed or generation.failed."),
    _Channel("generation.requested.voice", VoiceRequested, ("receive",), "conversation_id",
             "Voice requests, answered on generation.completed or generation.failed."),
    _Channel("generation.requested.lora", LoraTrainingRequested, ("receive",), "character_id",
             "Character LoRA trainings; progress on generation.progress, the LoRA on "
             "generation.completed."),
    _Channel("generation.control", GenerationControl, ("receive", "send"), "conversation_id",
             "Cancels of pending requests. Every engine instance reads every record (no "
             "consumer group); the engine also publishes here for DELETE /requests/{id}."),
    _Channel("generation.completed", GenerationCompleted, ("send",),
             "the request's key (conversation_id; character_id for LoRA trainings)",
             "Results of every kind, flat: the fields of the other kinds are null."),
    _Channel("generation.failed", GenerationFailed, ("send",),
             "the request record's key as received, byte for byte (absent when the record "
             "had none): the conversation_id for records that follow the contract, and "
             "whatever bytes a malformed record carried, so its answer lands beside it",
             "Failed requests, and records that were no valid request (request_id null).",
             key_utf8=False),
    _Channel("generation.progress", GenerationProgress, ("send",), "the request's key",
             "Progress of long work (LoRA training): step of total, with the loss."),
)

_SNIFFED = "`C3 01` or `00` Avro, `{` JSON"  # what schemas.codec sniffs without a header
_AVRO_FRAMING = ("Avro single-object encoding (`C3 01`, the 8-byte fingerprint, the body); "
                 "with a Schema Registry (`SCHEMA_REGISTRY_URL`), Confluent's wire format: "
                 "`00`, the 4-byte big-endian schema id (registered under the subject "
                 "`{topic}-value`, topic prefix included), the body.")
_DESCRIPTION = """\
Event API of the multimodal engine: image and voice generation and character LoRA
training for AI companions, requested and answered over Kafka.

- Topic names may carry a prefix (`KAFKA_TOPIC_PREFIX`); the addresses here are without it.
- Every record the engine publishes has the headers `content-type` (`avro/binary` or
  `application/json`, per `EVENT_ENCODING`) and `request_id`. Requests may carry either
  encoding; without a `content-type` header the engine sniffs the value (`C3 01` or `00`
  Avro, `{` JSON).
- `avro/binary` is Avro single-object encoding: `C3 01`, the 8-byte little-endian
  CRC-64-AVRO fingerprint of the writer schema, then the Avro binary body. Any instance
  serves the writer schema of a fingerprint over HTTP at `GET /schemas/{fingerprint}`
  (16 hex digits), for readers whose `.avsc` files are older. JSON carries the same
  fields; bytes are standard base64.
- With a Schema Registry (`SCHEMA_REGISTRY_URL`), the engine publishes Avro in Confluent's
  wire format instead: a zero byte (`00`), the 4-byte big-endian schema id the registry
  gave, then the Avro binary body. At start-up it registers the writer schema of each
  event it publishes under the subject `{topic}-value`, topic prefix included
  (`{KAFKA_TOPIC_PREFIX}generation.completed-value`, and the same for generation.failed,
  generation.progress and generation.control). Requests may come in either framing on the
  same topic; the writer schema of a `00`-framed request is fetched from the registry by
  its id. Without a registry, a `00`-framed request is answered `UNDECODABLE`.
- `traceparent` / `tracestate` (W3C Trace Context) are optional; when a request carries
  them the engine's answers continue the trace.
- A record that cannot be decoded or validated is answered on `generation.failed`
  (`UNDECODABLE` or `INVALID_REQUEST`) and committed; it never blocks its partition.

Generated by `multimodal-engine docs` from the code; do not edit by hand."""


def message_id(model: type[Event], encoding: Encoding) -> str:
    """The id of a message in the document: ``ImageRequestedJson``, ``ImageRequestedAvro``."""
    return f"{model.__name__}{encoding.capitalize()}"


def build_asyncapi() -> dict[str, Any]:
    """The AsyncAPI 3.0 document as a JSON-able dict. Raises ``ValueError`` when the code
    disagrees with itself: a contract topic without a channel here, an event without its
    ``.avsc``, an example its event rejects."""
    addresses = sorted(channel.address for channel in _CHANNELS)
    if addresses != sorted(CONTRACT_TOPICS):
        raise ValueError(f"channels {addresses} differ from CONTRACT_TOPICS")
    channels = sorted(_CHANNELS, key=lambda c: c.address)
    fields = Settings.model_fields
    return {
        "asyncapi": "3.0.0",
        "info": {"title": "multimodal-engine", "version": engine_version(),
                 "description": _DESCRIPTION},
        "defaultContentType": JSON_CONTENT_TYPE,
        "servers": {"kafka": {
            "host": "localhost:9092", "protocol": "kafka",
            "description": "The broker of KAFKA_BOOTSTRAP_SERVERS (`multimodal-engine dev` "
                           "starts an embedded one)."}},
        "channels": {_channel_id(c): _channel(c, fields["kafka_topic_partitions"].default)
                     for c in channels},
        "operations": dict(sorted(
            (f"{action}{c.model.__name__}", _operation(c, action, fields["kafka_group_id"]
                                                        .default))
            for c in channels for action in c.actions)),
        "components": {"messages": _messages(channels), "schemas": _schemas(channels)},
    }


def _channel_id(channel: _Channel) -> str:
    first, *rest = channel.address.split(".")
    return first + "".join(part.capitalize() for part in rest)


def _channel(channel: _Channel, partitions: int) -> dict[str, Any]:
    return {
        "address": channel.address,
        "title": channel.address,
        "description": channel.summary,
        "messages": {message_id(channel.model, encoding): {
            "$ref": f"#/components/messages/{message_id(channel.model, encoding)}"}
            for encoding in ("json", "avro")},
        "bindings": {"kafka": {"topic": channel.address, "partitions": partitions,
                               "bindingVersion": _KAFKA_BINDING}},
    }


def _operation(channel: _Channel, action: Action, group: str) -> dict[str, Any]:
    cid = _channel_id(channel)
    operation: dict[str, Any] = {
        "action": action,
        "channel": {"$ref": f"#/channels/{cid}"},
        "summary": ("The engine consumes " if action == "receive" else "The engine publishes ")
        + channel.address + ".",
        "messages": [{"$ref": f"#/channels/{cid}/messages/{message_id(channel.model, e)}"}
                     for e in ("json", "avro")],
    }
    if action == "receive" and channel.address.startswith("generation.requested."):
        operation["bindings"] = {"kafka": {
            "groupId": {"type": "string", "enum": [group],
                        "description": "KAFKA_GROUP_ID (the default shown)"},
            "bindingVersion": _KAFKA_BINDING}}
    return operation


def _messages(channels: list[_Channel]) -> dict[str, Any]:
    messages: dict[str, Any] = {}
    for channel in channels:
        for encoding in ("json", "avro"):
            messages[message_id(channel.model, encoding)] = _message(channel, encoding)
    return dict(sorted(messages.items()))


def _message(channel: _Channel, encoding: Encoding) -> dict[str, Any]:
    model = channel.model
    content_type = AVRO_CONTENT_TYPE if encoding == "avro" else JSON_CONTENT_TYPE
    payload: dict[str, Any] = (
        {"schemaFormat": AVRO_SCHEMA_FORMAT, "schema": _avsc(model.avro_name)}
        if encoding == "avro" else {"$ref": f"#/components/schemas/{model.__name__}"})
    summary = (model.__doc__ or model.__name__).strip().splitlines()[0].replace("``", "`")
    example = _example(model, inbound=channel.inbound)
    message: dict[str, Any] = {
        "name": model.__name__,
        "title": f"{model.__name__} ({encoding.upper()})",
        "summary": summary,
        "contentType": content_type,
        "headers": {"$ref": f"#/components/schemas/{_headers_id(channel.inbound, encoding)}"},
        "payload": payload,
        "correlationId": {"location": "$message.header#/request_id",
                          "description": "The request's request_id, on every answer."},
        "bindings": {"kafka": {
            "key": {"type": "string", "description": (
                f"UTF-8: {channel.key}" if channel.key_utf8 else channel.key)},
            "bindingVersion": _KAFKA_BINDING}},
        "examples": [{
            "name": f"{model.__name__}{encoding.capitalize()}Example",
            "summary": f"A {model.__name__} event",
            "headers": {"content-type": content_type, "request_id": example["request_id"]},
            "payload": example,
        }],
    }
    descriptions = [_AVRO_FRAMING] if encoding == "avro" else []
    if model is GenerationFailed:  # what error_code may say, and which codes are retryable
        descriptions.append(error_code_schema()["description"])
    if descriptions:
        message["description"] = "\n\n".join(descriptions)
    return message


def _example(model: type[Event], *, inbound: bool) -> dict[str, Any]:
    """The example, validated by ``model``: as a producer sends it (inbound), or with every
    field as the engine writes it (outbound)."""
    event = model.model_validate(EXAMPLES[model.__name__])
    return event.model_dump(mode="json", exclude_unset=inbound)


def _headers_id(inbound: bool, encoding: Encoding) -> str:
    return f"{'Request' if inbound else 'Event'}Headers{encoding.capitalize()}"


def _headers(inbound: bool, encoding: Encoding) -> dict[str, Any]:
    content_type = AVRO_CONTENT_TYPE if encoding == "avro" else JSON_CONTENT_TYPE
    kind: dict[str, Any] = (
        {"type": "string", "examples": [content_type], "description":
         f"Optional: without it the engine sniffs the value ({_SNIFFED})."}
        if inbound else {"type": "string", "const": content_type})
    return {
        "type": "object",
        "properties": {
            "content-type": kind,
            "request_id": {"type": "string", "description":
                           "The event's request_id (empty when it has none)."},
            "traceparent": {"type": "string", "pattern": TRACEPARENT_PATTERN, "description":
                            "W3C Trace Context, optional; answers continue the request's "
                            "trace."},
            "tracestate": {"type": "string", "description": "W3C Trace Context, optional."},
        },
        "required": [] if inbound else ["content-type", "request_id"],
    }


def _schemas(channels: list[_Channel]) -> dict[str, Any]:
    modes: list[tuple[type[Event], Mode]] = [
        (c.model, "validation" if c.inbound else "serialization") for c in channels]
    schemas = component_schemas(modes)
    code = schemas["GenerationFailed"]["properties"]["error_code"]
    code["description"] = ("An `ErrorCode` (components/schemas/ErrorCode); a plain string, "
                           "so that readers accept codes added later.")
    schemas["ErrorCode"] = error_code_schema()
    for inbound in (True, False):
        for encoding in ("avro", "json"):
            schemas[_headers_id(inbound, encoding)] = _headers(inbound, encoding)
    return dict(sorted(schemas.items()))


def _avsc(full_name: str) -> dict[str, Any]:
    """The current ``.avsc`` whose full name is ``full_name``."""
    folder = resources.files("schemas") / "avro"
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".avsc"):
            schema: dict[str, Any] = json.loads(entry.read_text("utf-8"))
            if f"{schema.get('namespace')}.{schema.get('name')}" == full_name:
                return schema
    raise ValueError(f"no .avsc in schemas/avro is named {full_name}")
