"""Pronunciation dictionaries: names and slang said the same way every time.

A voice profile lists up to :data:`MAX_DICTIONARIES` dictionaries made in the ElevenLabs
account (``{"id": …, "version_id": …}``; without ``version_id`` the latest version
applies); they travel with every request of that character as ElevenLabs'
``pronunciation_dictionary_locators``, applied in order.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["MAX_DICTIONARIES", "PronunciationDictionary", "locators"]

MAX_DICTIONARIES = 3  # ElevenLabs: "up to 3 locators per request"

_Id = Annotated[str, Field(min_length=1, max_length=200, pattern=r"\S")]


class PronunciationDictionary(BaseModel):
    """One dictionary of the ElevenLabs account: ``id`` and, to pin it, ``version_id``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: _Id
    version_id: _Id | None = None


def locators(dictionaries: tuple[PronunciationDictionary, ...]) -> list[dict[str, Any]]:
    """``dictionaries`` as the ``pronunciation_dictionary_locators`` of ElevenLabs' request
    body (``PronunciationDictionaryVersionLocatorRequestModel``)."""
    return [
        {"pronunciation_dictionary_id": d.id, "version_id": d.version_id}
        if d.version_id is not None else {"pronunciation_dictionary_id": d.id}
        for d in dictionaries
    ]
