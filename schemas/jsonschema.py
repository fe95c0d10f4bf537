"""The events (and other pydantic bodies) as JSON Schema, for the AsyncAPI and OpenAPI
documents: one schema per model under ``#/components/schemas/{name}``, the name the
model's class name, deterministic for the same models.

Bytes travel as standard base64 in JSON (``WireBytes``), so a ``format: binary`` string is
written as ``contentEncoding: base64``; reST literals in docstrings become Markdown.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from typing import Any, Literal

from pydantic import BaseModel, TypeAdapter
from pydantic.json_schema import models_json_schema

from schemas.errors import EngineError, ErrorCode

__all__ = ["COMPONENT_REF", "Mode", "component_schemas", "dataclass_schema", "error_code_schema"]

_ROLE = re.compile(r":\w+:`~?([^`]+)`")  # :class:`~a.B` in a docstring

COMPONENT_REF = "#/components/schemas/{model}"
"""Where both documents keep their schemas (``$ref`` template)."""

Mode = Literal["validation", "serialization"]
"""``validation``: what the engine accepts; ``serialization``: what it writes."""


def component_schemas(models: Iterable[tuple[type[BaseModel], Mode]]) -> dict[str, Any]:
    """The schemas of ``models`` and of the models they nest, by class name.

    Raises ``ValueError`` when two models share a class name (their schemas would
    collide)."""
    pairs = list(models)
    names = [model.__name__ for model, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError(f"two models share a name among {sorted(names)}")
    _, schema = models_json_schema(pairs, ref_template=COMPONENT_REF)
    defs: dict[str, Any] = schema.get("$defs", {})
    return {name: _wire(defs[name]) for name in sorted(defs)}


def dataclass_schema(kind: type[Any], mode: Mode = "serialization",
                     known: Collection[str] = ()) -> dict[str, Any]:
    """The schema of a dataclass (or any type pydantic can describe) without nested
    definitions but those named in ``known`` (already among the components); raises
    ``ValueError`` when it needs others."""
    schema = TypeAdapter(kind).json_schema(mode=mode, ref_template=COMPONENT_REF)
    if set(schema.pop("$defs", {})) - set(known):
        raise ValueError(f"{kind.__name__} nests other types; describe it with a model")
    wired: dict[str, Any] = _wire(schema)
    return wired


# What each code means to the reader of a generation.failed event or an error body.
_CODE_MEANINGS: dict[ErrorCode, str] = {
    ErrorCode.UNDECODABLE: "the record is no event at all (bytes, encoding, schema)",
    ErrorCode.INVALID_REQUEST: "the event decoded but a field is wrong (named in the message)",
    ErrorCode.UNKNOWN_LORA: "character_lora_id names no LoRA this engine has",
    ErrorCode.UPSTREAM_UNAVAILABLE: "an upstream (ElevenLabs, a URL) failed transiently",
    ErrorCode.UPSTREAM_REJECTED: "an upstream refused the request (400/401/422)",
    ErrorCode.QUOTA_EXCEEDED: "the voice provider's quota is used up",
    ErrorCode.OUT_OF_MEMORY: "the GPU ran out of memory",
    ErrorCode.TIMEOUT: "the work took longer than allowed",
    ErrorCode.INTERNAL: "a fault of the engine",
    ErrorCode.CANCELLED: "withdrawn by generation.control or DELETE /requests/{request_id}",
    ErrorCode.EXPIRED: "not started by its deadline; no work was done",
}


def error_code_schema() -> dict[str, Any]:
    """The ``ErrorCode`` schema: every wire code, and a Markdown table of what each means
    and whether it is retryable. Raises ``ValueError`` for a code without a meaning here
    (add one to ``_CODE_MEANINGS``)."""
    retryable = {cls.code: cls.retryable for cls in _subclasses(EngineError)}
    missing = [code for code in ErrorCode if code not in _CODE_MEANINGS]
    if missing:
        raise ValueError(f"error codes without a meaning in schemas/jsonschema.py: {missing}")
    rows = [f"| `{code}` | {'yes' if retryable.get(code, False) else 'no'} | "
            f"{_CODE_MEANINGS[code]} |" for code in ErrorCode]
    return {
        "type": "string",
        "enum": [str(code) for code in ErrorCode],
        "description": "The engine's error codes (readers must accept codes added later).\n\n"
                       "| code | retryable | meaning |\n|---|---|---|\n" + "\n".join(rows),
    }


def _subclasses(root: type[EngineError]) -> list[type[EngineError]]:
    found: list[type[EngineError]] = []
    for cls in root.__subclasses__():
        found += [cls, *_subclasses(cls)]
    return found


def _wire(schema: Any) -> Any:
    """A copy of ``schema`` as JSON carries it: base64 for bytes, Markdown descriptions."""
    if isinstance(schema, list):
        return [_wire(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _wire(value) for key, value in schema.items()}
    if out.get("format") == "binary" and out.get("type") == "string":
        del out["format"]
        out["contentEncoding"] = "base64"
    if isinstance(out.get("description"), str):
        out["description"] = _ROLE.sub(r"`\1`", out["description"].replace("``", "`"))
    return out
