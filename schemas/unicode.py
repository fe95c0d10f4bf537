"""Lone surrogates: JSON's ``\\uD800`` escapes decode to strings that no UTF-8 output (an
Avro event, a JSON answer, a Kafka header, a log line) can carry. A request holding one is
refused where it is read, before anything echoes it back."""

from __future__ import annotations

from typing import Any

__all__ = ["first_lone_surrogate", "is_unicode_text"]


def first_lone_surrogate(value: Any) -> tuple[str | int, ...] | None:
    """The path (keys and list indexes) of a string, key or value, in the decoded JSON
    ``value`` that is not valid Unicode text, or ``None`` when all are. No recursion: a
    deep document cannot overflow the stack."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, ())]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if not is_unicode_text(item):
                return path
        elif isinstance(item, dict):
            for key, child in item.items():
                if not is_unicode_text(key):
                    return (*path, key.encode("utf-8", "replace").decode("utf-8"))
                stack.append((child, (*path, key)))
        elif isinstance(item, list):
            stack.extend((child, (*path, index)) for index, child in enumerate(item))
    return None


def is_unicode_text(text: str) -> bool:
    """Whether ``text`` holds no lone surrogate: whether UTF-8 can carry it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
