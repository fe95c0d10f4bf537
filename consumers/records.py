"""What a consumed record says of itself, read the same way everywhere: its content-type
header, and the text fields of a value that may not have decoded."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["content_type", "text_or_none"]


def content_type(headers: Iterable[tuple[str, bytes | None]] | None) -> str | None:
    """The ``content-type`` header (name case ignored) as text, or ``None``."""
    for name, value in headers or ():
        if name.lower() == "content-type" and value is not None:
            return value.decode("latin-1")
    return None


def text_or_none(value: object) -> str | None:
    """``value`` when it is a non-empty string (a field of an undecodable record may be
    anything), else ``None``."""
    return value if isinstance(value, str) and value else None
