"""The API documents as files: ``docs/asyncapi.yaml`` (:mod:`consumers.asyncapi`) and
``docs/openapi.json`` (:mod:`http_files.openapi`), rendered the same way every time so
that the checked-in files can be compared with what the code generates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from consumers.asyncapi import build_asyncapi
from http_files.openapi import openapi_text

__all__ = ["ASYNCAPI_FILE", "OPENAPI_FILE", "generated_documents", "render_yaml",
           "write_documents"]

ASYNCAPI_FILE = "asyncapi.yaml"
OPENAPI_FILE = "openapi.json"


class _Dumper(yaml.SafeDumper):  # type: ignore[misc]  # PyYAML has no type hints here
    """Block style; multi-line text as ``|`` literals, readable in a diff."""

    def ignore_aliases(self, data: Any) -> bool:
        return True  # a schema used twice is written twice, never as &anchor / *alias


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _text)


def render_yaml(document: dict[str, Any]) -> str:
    """``document`` as YAML, keys in the document's order, no aliases."""
    return str(yaml.dump(document, Dumper=_Dumper, sort_keys=False, allow_unicode=True,
                     width=100, default_flow_style=False))


def generated_documents() -> dict[str, str]:
    """The text each file of ``docs/`` should have, by file name."""
    return {ASYNCAPI_FILE: render_yaml(build_asyncapi()), OPENAPI_FILE: openapi_text()}


def write_documents(folder: Path) -> list[Path]:
    """Writes the documents into ``folder`` (made when missing); returns their paths.
    Raises ``OSError`` when they cannot be written, ``ValueError`` when the code
    disagrees with itself (see :func:`consumers.asyncapi.build_asyncapi`)."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in generated_documents().items():
        path = folder / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
