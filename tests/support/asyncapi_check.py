"""Kafka records checked against the checked-in ``docs/asyncapi.yaml``: the topic is one of
its channels, the headers fit the message's headers, the key is UTF-8, and the value fits
the message of its ``content-type``: JSON against the message's JSON Schema (strict: an
object may have no properties the document does not list), Avro by the document's own
``.avsc`` (its fingerprint is the record's, it reads the body to the last byte, and what it
reads fits the JSON Schema of the same event).

:class:`EventChecker` is used by :class:`tests.support.kafka_client.PersonaPeer` on every
record it receives, so every integration test that reads answers checks them.
"""

from __future__ import annotations

import base64
import functools
import io
import json
from pathlib import Path
from typing import Any

import fastavro
import yaml
from jsonschema import Draft7Validator
from jsonschema.exceptions import best_match
from referencing import Registry
from referencing.jsonschema import DRAFT7

from schemas.codec import schema_fingerprint
from tests.support.openapi_check import DOCS, strict

__all__ = ["EventChecker", "asyncapi"]

_URI = "urn:multimodal-engine:asyncapi"
_HEADER_LEN = 10  # C3 01 + the 8-byte fingerprint
_REGENERATE = "run `multimodal-engine docs` if the code changed on purpose"


@functools.cache
def asyncapi(path: Path = DOCS / "asyncapi.yaml") -> dict[str, Any]:
    """The checked-in document, read once."""
    document: dict[str, Any] = yaml.safe_load(path.read_text("utf-8"))
    return document


class _Message:
    """One message of a channel: its validators and, for Avro, its writer schema."""

    def __init__(self, registry: Registry, pointer: str, message: dict[str, Any],
                 json_payload: str) -> None:
        self.content_type: str = message["contentType"]
        self.headers = _validator(registry, f"{pointer}/headers")
        self.key = _validator(registry, f"{pointer}/bindings/kafka/key")
        # the document says a key is UTF-8 by starting its description so
        key_text = message["bindings"]["kafka"]["key"].get("description", "")
        self.key_passed_on = not key_text.startswith("UTF-8")
        self.payload = _validator(registry, json_payload)
        payload = message["payload"]
        self.avro: Any = None
        self.fingerprint = b""
        if "schemaFormat" in payload and "avro" in payload["schemaFormat"]:
            self.avro = fastavro.parse_schema(payload["schema"], named_schemas={})
            self.fingerprint = schema_fingerprint(payload["schema"])


class EventChecker:
    """Checks records of the topics named ``{prefix}{channel address}``."""

    def __init__(self, prefix: str = "", document: dict[str, Any] | None = None) -> None:
        self.prefix = prefix
        document = strict(document or asyncapi())
        registry: Registry = Registry().with_resource(_URI, DRAFT7.create_resource(document))
        messages = document["components"]["messages"]
        self._channels: dict[str, dict[str, _Message]] = {}
        for channel in document["channels"].values():
            ids = [ref["$ref"].rsplit("/", 1)[1] for ref in channel["messages"].values()]
            json_ids = [i for i in ids if messages[i]["contentType"] == "application/json"]
            by_type = {}
            for message_id in ids:
                pointer = f"{_URI}#/components/messages/{message_id}"
                # an Avro record must read as the same event as the channel's JSON message
                json_payload = f"{_URI}#/components/messages/{json_ids[0]}/payload"
                message = _Message(registry, pointer, messages[message_id], json_payload)
                by_type[message.content_type] = message
            self._channels[channel["address"]] = by_type

    def check(self, topic: str, key: bytes | None, headers: dict[str, bytes],
              value: bytes | None) -> None:
        """Raises ``AssertionError`` naming the topic and what does not fit."""
        where = f"record on {topic}"
        address = topic.removeprefix(self.prefix)
        by_type = self._channels.get(address)
        if by_type is None:
            raise AssertionError(f"{where}: no channel {address!r} in docs/asyncapi.yaml")
        try:
            text_headers = {name: raw.decode("utf-8") for name, raw in headers.items()}
        except UnicodeDecodeError:
            raise AssertionError(f"{where}: a header is not UTF-8: {headers}") from None
        media = text_headers.get("content-type", "").split(";")[0].strip().lower()
        if not media:
            media = "avro/binary" if (value or b"").startswith(b"\xc3\x01") else "application/json"
        message = by_type.get(media)
        if message is None:
            raise AssertionError(f"{where}: content-type {media!r} is not documented for "
                                 f"{address} ({sorted(by_type)})")
        _fits(message.headers, text_headers, f"{where}: headers")
        if key is not None:
            try:
                _fits(message.key, key.decode("utf-8"), f"{where}: key")
            except UnicodeDecodeError:
                # generation.failed passes a malformed record's key on as it came
                if not message.key_passed_on:
                    raise AssertionError(f"{where}: the key is not UTF-8: {key!r}") from None
        event = _read_avro(message, value, where) if message.avro is not None else (
            _read_json(value, where))
        _fits(message.payload, event, f"{where}: value")


def _validator(registry: Registry, uri: str) -> Draft7Validator:
    return Draft7Validator({"$ref": uri}, registry=registry)


def _fits(validator: Draft7Validator, instance: Any, what: str) -> None:
    error = best_match(validator.iter_errors(instance))
    if error is not None:
        path = "/".join(str(part) for part in error.absolute_path)
        raise AssertionError(f"{what} does not fit docs/asyncapi.yaml at /{path}: "
                             f"{error.message}; {_REGENERATE}")


def _read_json(value: bytes | None, where: str) -> Any:
    try:
        return json.loads(value or b"")
    except ValueError as exc:
        raise AssertionError(f"{where}: the value is not JSON: {exc}") from None


def _read_avro(message: _Message, value: bytes | None, where: str) -> Any:
    value = value or b""
    if value[:2] != b"\xc3\x01" or value[2:_HEADER_LEN] != message.fingerprint:
        raise AssertionError(
            f"{where}: not written with the document's Avro schema: header "
            f"{value[:_HEADER_LEN].hex()}, expected c301{message.fingerprint.hex()}; "
            f"{_REGENERATE}")
    body = io.BytesIO(value[_HEADER_LEN:])
    try:
        record = fastavro.schemaless_reader(body, message.avro, None)
    except Exception as exc:  # noqa: BLE001 - fastavro signals a bad body with many types
        raise AssertionError(f"{where}: the document's Avro schema cannot read it: "
                             f"{type(exc).__name__}: {exc}") from None
    if body.tell() != len(value) - _HEADER_LEN:
        raise AssertionError(f"{where}: bytes after the Avro body")
    return _as_json(record)


def _as_json(value: Any) -> Any:
    """An Avro record as its JSON encoding carries it (bytes as base64)."""
    if isinstance(value, dict):
        return {k: _as_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_json(v) for v in value]
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    return value
