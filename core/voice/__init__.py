"""Voice: text to an MP3 output, through ElevenLabs or the local espeak-ng engine.

:class:`VoiceService` is the one entry; backends (:class:`VoiceBackend`) and emotion
injectors (:class:`EmotionInjector`) are injected into it.
"""

from core.voice.backend import VoiceBackend, VoiceSettings
from core.voice.emotion import EmotionInjector, PunctuationInjector
from core.voice.espeak import EspeakSynthesizer
from core.voice.factory import build_voice_service
from core.voice.local import LocalVoiceBackend
from core.voice.mp3 import audio_duration, write_mp3
from core.voice.service import VoiceJob, VoiceRequestLike, VoiceResult, VoiceService
from core.voice.tags import strip_audio_tags

__all__ = [
    "EmotionInjector",
    "EspeakSynthesizer",
    "LocalVoiceBackend",
    "PunctuationInjector",
    "VoiceBackend",
    "VoiceJob",
    "VoiceRequestLike",
    "VoiceResult",
    "VoiceService",
    "VoiceSettings",
    "audio_duration",
    "build_voice_service",
    "strip_audio_tags",
    "write_mp3",
]
