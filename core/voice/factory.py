"""Choosing and building the voice backend from settings (``VOICE_BACKEND``)."""

from __future__ import annotations

from core.outputs import OutputStore
from core.settings import ConfigurationError, Settings
from core.voice.espeak import EspeakSynthesizer
from core.voice.local import LocalVoiceBackend
from core.voice.service import VoiceService

__all__ = ["build_voice_service"]


def build_voice_service(settings: Settings, store: OutputStore) -> VoiceService:
    """The voice core for these settings: local espeak-ng for ``local`` (or ``auto``
    without a key).

    Raises :class:`ConfigurationError` when ElevenLabs is selected, since this build has
    no ElevenLabs backend yet: a key must never silently fall back to another voice.
    """
    if settings.use_elevenlabs:
        raise ConfigurationError(
            f"invalid configuration: VOICE_BACKEND={settings.voice_backend!r} with an "
            "ElevenLabs key selects the ElevenLabs backend, which this build does not "
            "include yet (allowed: VOICE_BACKEND='local')"
        )
    return VoiceService(LocalVoiceBackend(EspeakSynthesizer()), store, settings.default_voice_id)
