"""Bytes on the wire ⇄ events: Avro single-object encoding and JSON.

Avro records are ``C3 01`` + the 8-byte little-endian CRC-64-AVRO fingerprint of the writer
schema's Parsing Canonical Form + the Avro binary body (the Avro specification's
"single-object encoding"). With a Schema Registry (:class:`~schemas.registry.RegistryFraming`)
records are written in Confluent's wire format instead (``00`` + the 4-byte big-endian
schema id + the body); readers take both framings on the same topic. A reader finds the writer schema by its fingerprint among the
current ``.avsc`` files, ``schemas/avro/history/*.avsc`` and any extra writer schemas it was
given, and resolves it against the *current* schema of the same name, so records written
with an older version of a schema still read (added fields take their defaults).

Every way a record can fail to be an event ends in :class:`UndecodableError` (no event at
all) or :class:`InvalidRequestError` (an event with a bad field): the consume loop turns
either into a ``generation.failed`` event and moves on.
"""

from __future__ import annotations

import io
import json
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeVar

import fastavro
from fastavro.schema import SchemaParseException, fingerprint, to_parsing_canonical_form
from pydantic import ValidationError

from schemas.errors import InvalidRequestError, UndecodableError
from schemas.events import Event
from schemas.registry import (
    CONFLUENT_HEADER_LEN,
    CONFLUENT_MAGIC,
    RegistryFraming,
    SchemaRegistryUnavailable,
)
from schemas.unicode import first_lone_surrogate

__all__ = ["AVRO_CONTENT_TYPE", "JSON_CONTENT_TYPE", "Encoding", "EventCodec", "schema_fingerprint"]

AVRO_CONTENT_TYPE = "avro/binary"
JSON_CONTENT_TYPE = "application/json"

Encoding = Literal["avro", "json"]

E = TypeVar("E", bound=Event)

_AVRO_DIR = Path(__file__).with_name("avro")
_MAGIC = b"\xc3\x01"
_HEADER_LEN = len(_MAGIC) + 8
_MAX_LISTED_ERRORS = 10  # a hostile record can fail thousands of items; the message stays short


@dataclass(frozen=True)
class _Schema:
    name: str
    parsed: Any  # fastavro's parsed form (a dict it annotates for itself)
    fingerprint: bytes
    text: str  # the schema as JSON, as written (docs and defaults kept): what readers fetch


def schema_fingerprint(schema: Mapping[str, Any]) -> bytes:
    """The 8-byte CRC-64-AVRO fingerprint of ``schema``'s Parsing Canonical Form, in the
    little-endian byte order of the single-object header.

    Raises ``ValueError`` when the schema is not a valid Avro record schema.
    """
    return _parse(schema).fingerprint


def _parse(schema: Mapping[str, Any]) -> _Schema:
    text = json.dumps(schema, ensure_ascii=False)  # before fastavro sees it
    # A fresh name table per schema: two versions of one record must not collide.
    try:
        parsed = fastavro.parse_schema(dict(schema), named_schemas={})
    except SchemaParseException as exc:  # not a ValueError, unlike fastavro's UnknownType
        raise ValueError(f"invalid Avro schema {schema.get('name')!r}: {exc}") from exc
    if not isinstance(parsed, dict) or parsed.get("type") != "record":
        raise ValueError(f"an event schema must be an Avro record, not {schema.get('type')!r}")
    # fastavro gives the hex of the little-endian bytes, the order of the single-object header.
    fp = bytes.fromhex(fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"))
    return _Schema(name=str(parsed["name"]), parsed=parsed, fingerprint=fp, text=text)


@lru_cache(maxsize=256)
def _parse_text(text: str) -> _Schema:
    """A registry's writer schema, parsed once however many records name it."""
    return _parse(json.loads(text))


def _load_dir(directory: Path) -> list[_Schema]:
    if not directory.is_dir():
        return []
    return [_parse(json.loads(p.read_text("utf-8"))) for p in sorted(directory.glob("*.avsc"))]


class EventCodec:
    """Encodes events for publishing and decodes records into validated events.

    Immutable after construction, so one instance may be shared by every task and thread.
    """

    def __init__(self, extra_writer_schemas: Iterable[Mapping[str, Any]] = (),
                 framing: RegistryFraming | None = None) -> None:
        """Load the current schemas (``schemas/avro/*.avsc``) and, for reading only, the
        older ones in ``schemas/avro/history/`` and ``extra_writer_schemas``. With
        ``framing`` (a Schema Registry), Avro is written in Confluent's wire format for the
        topics whose schemas were registered, and Confluent-framed records are read.

        Raises ``ValueError`` when a schema is not valid Avro or two current schemas share
        a name.
        """
        self._current: dict[str, _Schema] = {}
        for schema in _load_dir(_AVRO_DIR):
            if schema.name in self._current:
                raise ValueError(f"two current schemas are named {schema.name}")
            self._current[schema.name] = schema
        older = _load_dir(_AVRO_DIR / "history") + [_parse(s) for s in extra_writer_schemas]
        self._writers: dict[bytes, _Schema] = {s.fingerprint: s for s in older}
        self._writers.update({s.fingerprint: s for s in self._current.values()})
        self.framing = framing

    def current_schema(self, name: str) -> str:
        """The current writer schema (JSON text) of the event named ``name`` (its Avro
        full name); ``KeyError`` when there is none."""
        return self._current[name].text

    def writer_schema(self, fingerprint: bytes) -> str | None:
        """The writer schema (JSON text, as its ``.avsc`` file has it) of the single-object
        ``fingerprint`` (8 bytes, header order), current or earlier; ``None`` when this
        codec does not know it."""
        schema = self._writers.get(fingerprint)
        return None if schema is None else schema.text

    # --- encoding -------------------------------------------------------------------------

    @staticmethod
    def content_type(encoding: Encoding) -> str:
        """The ``content-type`` header value for ``encoding``; ``ValueError`` for others."""
        if encoding == "avro":
            return AVRO_CONTENT_TYPE
        if encoding == "json":
            return JSON_CONTENT_TYPE
        raise ValueError(f"unknown encoding {encoding!r}; expected 'avro' or 'json'")

    def encode(self, event: Event, encoding: Encoding, topic: str | None = None) -> bytes:
        """The record value of ``event``: compact UTF-8 JSON with every field (nulls
        included), or Avro with the event's current schema: in Confluent's wire format when
        this codec has a registry and the schema was registered for ``topic``, else in
        single-object encoding (which every reader takes).

        Raises ``ValueError`` for an unknown encoding or an event type without a schema;
        fastavro's errors when the event does not fit its schema (a programming error: the
        models and the ``.avsc`` files are kept equal by the tests).
        """
        if encoding == "json":
            return event.model_dump_json().encode("utf-8")
        if encoding != "avro":
            raise ValueError(f"unknown encoding {encoding!r}; expected 'avro' or 'json'")
        schema = self._current.get(type(event).avro_name)
        if schema is None:
            raise ValueError(f"no Avro schema named {type(event).avro_name}")
        out = io.BytesIO()
        header = None
        if self.framing is not None and topic is not None:
            header = self.framing.header(topic, schema.name)
        out.write(header if header is not None else _MAGIC + schema.fingerprint)
        # strict: a field of the model missing from the schema (or back) fails loudly here
        fastavro.schemaless_writer(out, schema.parsed, event.model_dump(mode="python"), strict=True)
        return out.getvalue()

    # --- decoding -------------------------------------------------------------------------

    def decode_raw(
        self, value: bytes | None, content_type: str | bytes | None
    ) -> tuple[str | None, dict[str, Any]]:
        """Decode a record value into ``(avro schema full name, fields)``; the name is
        ``None`` for JSON, which does not say what it is.

        The encoding is the ``content-type`` header's, given as text or as the header's raw
        bytes (``avro/binary``, ``application/json`` or ``application/*+json``, parameters
        and case ignored); without one (``None`` or empty) it is sniffed:
        ``C3 01`` or ``00`` (Confluent's wire format) is Avro, a first non-blank ``{`` is JSON.
        A Confluent-framed record's writer schema must have been fetched first
        (:meth:`resolve_writer`).

        Raises :class:`UndecodableError` for an empty value, an unsupported content type,
        bytes that are neither encoding, an unknown writer fingerprint, a truncated or
        corrupt Avro body or bytes after it, a Confluent-framed record without a registry
        or with an id the registry does not have, and invalid UTF-8, invalid JSON or JSON that is
        not an object.
        """
        if not value:
            raise UndecodableError("record value is empty")
        if _encoding_of(content_type, value) == "avro":
            return self._decode_avro(value)
        return None, _decode_json(value)

    def validate(self, model: type[E], raw: Mapping[str, Any], schema_name: str | None = None) -> E:
        """``raw`` validated as ``model``.

        Raises :class:`InvalidRequestError` when ``schema_name`` (the Avro writer's) is
        another event than ``model`` (``field`` None), or when a field is invalid: ``field``
        is the first bad field's dotted path (``images.0.data``), ``errors`` lists them all
        and the message reads ``text: Field required``.
        """
        if schema_name is not None and schema_name != model.avro_name:
            raise InvalidRequestError(f"expected {model.avro_name}, got {schema_name}")
        where = first_lone_surrogate(raw)
        if where is not None:  # nothing holding one may be echoed: refuse it here
            field = ".".join(map(str, where))
            message = "not Unicode text: a lone surrogate escape (\\uD800-\\uDFFF)"
            raise InvalidRequestError(f"{field}: {message}", field=field,
                                      errors=[{"field": field, "message": message}])
        try:
            return model.model_validate(raw)
        except ValidationError as exc:
            _raise_invalid(exc)

    def decode(self, value: bytes | None, content_type: str | bytes | None, model: type[E]) -> E:
        """:meth:`decode_raw` then :meth:`validate`; raises what they raise."""
        schema_name, raw = self.decode_raw(value, content_type)
        return self.validate(model, raw, schema_name)

    async def resolve_writer(self, value: bytes | None) -> None:
        """Fetches (once, then cached) the writer schema of a Confluent-framed ``value``
        from the registry; a no-op without a registry and for other values.

        Raises :class:`~schemas.registry.SchemaRegistryUnavailable` while the registry
        cannot answer (transient: the record waits) and
        :class:`~schemas.registry.SchemaRegistryError` for another failure.
        """
        if self.framing is not None and value:
            await self.framing.resolve(value)

    async def resolve_writer_waiting(
        self, value: bytes | None, pause: Callable[[int, Exception], Awaitable[None]]
    ) -> None:
        """:meth:`resolve_writer`, waiting out a registry outage for as long as it lasts:
        after each failed try ``pause(tries, error)`` is awaited (the caller's backoff and
        log line). A registry outage delays a record, it never fails it; raises
        :class:`~schemas.registry.SchemaRegistryError` for any other failure."""
        tries = 0
        while True:
            try:
                await self.resolve_writer(value)
                return
            except SchemaRegistryUnavailable as exc:
                tries += 1
                await pause(tries, exc)

    def _writer_of(self, value: bytes) -> tuple[_Schema, int]:
        """The writer schema of an Avro ``value`` and where its body starts."""
        if value.startswith(CONFLUENT_MAGIC):
            return self._registry_writer(value), CONFLUENT_HEADER_LEN
        if len(value) < _HEADER_LEN or not value.startswith(_MAGIC):
            raise UndecodableError(
                "not Avro single-object encoding: expected C3 01 and an 8-byte fingerprint"
            )
        fp = value[len(_MAGIC) : _HEADER_LEN]
        writer = self._writers.get(fp)
        if writer is None:
            raise UndecodableError(f"unknown Avro writer schema fingerprint {fp.hex()}")
        return writer, _HEADER_LEN

    def _registry_writer(self, value: bytes) -> _Schema:
        if len(value) < CONFLUENT_HEADER_LEN:
            raise UndecodableError("Confluent wire format without its 4-byte schema id")
        schema_id = int.from_bytes(value[1:CONFLUENT_HEADER_LEN], "big")
        if self.framing is None:
            raise UndecodableError(
                f"record is in Confluent's wire format (schema id {schema_id}) but "
                "SCHEMA_REGISTRY_URL is not set: its writer schema cannot be found")
        text = self.framing.cached(schema_id)
        if text is None:  # resolve_writer was not awaited: a caller's bug, said as such
            raise UndecodableError(f"writer schema id {schema_id} was not fetched from the "
                                   "Schema Registry")
        if not text:
            raise UndecodableError(f"the Schema Registry has no Avro schema with id "
                                   f"{schema_id}", detail=f"registry {self.framing.url}")
        try:
            return _parse_text(text)
        except ValueError as exc:  # json's errors included
            raise UndecodableError(f"the Schema Registry's schema id {schema_id} is not a "
                                   "usable Avro record schema", detail=str(exc)) from exc

    def _decode_avro(self, value: bytes) -> tuple[str, dict[str, Any]]:
        writer, start = self._writer_of(value)
        reader = self._current.get(writer.name, writer)
        body = io.BytesIO(value)
        body.seek(start)
        try:
            record = fastavro.schemaless_reader(
                body, writer.parsed, None if reader is writer else reader.parsed
            )
        # The bytes are hostile input and fastavro signals bad ones with many types (EOFError,
        # ValueError, UnicodeDecodeError, IndexError, SchemaResolutionError, ...); any of
        # them means "not a record of this schema". The caller is told that in its terms;
        # fastavro's words are the detail, for the log.
        except EOFError as exc:
            raise UndecodableError(
                f"truncated Avro body for {writer.name}: the bytes end inside the record",
                detail=_detail(exc)) from exc
        except Exception as exc:
            raise UndecodableError(
                f"corrupt Avro body for {writer.name}: the bytes are not a record of that "
                "schema", detail=_detail(exc)) from exc
        if body.tell() != len(value):
            raise UndecodableError(
                f"{len(value) - body.tell()} bytes after the Avro body of {writer.name}"
            )
        if not isinstance(record, dict):  # every schema here is a record; guard the type
            raise UndecodableError(f"Avro body of {writer.name} is not a record")
        return writer.name, record


def _encoding_of(content_type: str | bytes | None, value: bytes) -> Encoding:
    if isinstance(content_type, bytes):
        try:
            content_type = content_type.decode("utf-8")
        except UnicodeDecodeError:
            raise UndecodableError("content-type header is not UTF-8") from None
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media == AVRO_CONTENT_TYPE:
        return "avro"
    if media == JSON_CONTENT_TYPE or (media.startswith("application/") and media.endswith("+json")):
        return "json"
    if media:
        raise UndecodableError(
            f"unsupported content-type {media[:100]!r}; expected {AVRO_CONTENT_TYPE} or "
            f"{JSON_CONTENT_TYPE}"
        )
    if value.startswith((_MAGIC, CONFLUENT_MAGIC)):
        return "avro"
    if value.lstrip()[:1] == b"{":
        return "json"
    raise UndecodableError(
        f"no content-type and the value is neither Avro (C3 01 or 00) nor a JSON object: "
        f"starts with {value[:8].hex(' ')}"
    )


def _decode_json(value: bytes) -> dict[str, Any]:
    """The JSON object in ``value``; the errors say what is wrong in JSON's terms (where,
    and what), never the parser's own exception."""
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UndecodableError(f"JSON value is not UTF-8: invalid byte 0x{value[exc.start]:02x} "
                               f"at byte {exc.start}", detail=_detail(exc)) from exc
    try:
        # NaN and Infinity are not JSON, whatever Python's json module accepts by default.
        data = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise UndecodableError(f"invalid JSON at line {exc.lineno}, column {exc.colno}: "
                               f"{exc.msg[:1].lower()}{exc.msg[1:]}") from exc
    except _NotJson as exc:
        raise UndecodableError(f"invalid JSON: {exc}") from exc
    except RecursionError as exc:  # the C parser's own guard, at about 1000 levels
        raise UndecodableError("invalid JSON: objects and arrays nested too deep",
                               detail=_detail(exc)) from exc
    except ValueError as exc:  # the one other: an integer past sys.get_int_max_str_digits()
        raise UndecodableError("invalid JSON: a number has too many digits",
                               detail=_detail(exc)) from exc
    if not isinstance(data, dict):
        raise UndecodableError(f"JSON value is {_json_type(data)}, not an object")
    return data


class _NotJson(ValueError):
    """What the JSON module accepts that JSON does not (``NaN``, ``Infinity``)."""


def _reject_constant(name: str) -> NoReturn:
    raise _NotJson(f"{name} is not a JSON value")


def _json_type(value: Any) -> str:
    """The JSON name of a decoded value's type (``list`` is an array, ``None`` null)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return "a string" if isinstance(value, str) else "an array"


def _detail(exc: BaseException) -> str:
    """A decoder's exception, as the log shows it."""
    return f"{type(exc).__name__}: {exc}"[:300]


def _raise_invalid(exc: ValidationError) -> NoReturn:
    errors = [
        {"field": ".".join(str(part) for part in err["loc"]), "message": err["msg"]}
        for err in exc.errors(include_url=False, include_input=False)
    ]
    listed = [f"{e['field']}: {e['message']}" if e["field"] else e["message"] for e in errors]
    message = "; ".join(listed[:_MAX_LISTED_ERRORS])
    if len(listed) > _MAX_LISTED_ERRORS:
        message += f"; and {len(listed) - _MAX_LISTED_ERRORS} more"
    raise InvalidRequestError(message, field=errors[0]["field"] or None, errors=errors) from exc
