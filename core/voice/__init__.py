"""Voice: text to an audio output (MP3, Opus, WAV), streamed as it is made, through ElevenLabs or the local espeak-ng engine.

:class:`VoiceService` is the one entry; backends (:class:`VoiceBackend`: ElevenLabs,
local), emotion injectors (:class:`EmotionInjector`: rules, the Persona Engine's LLM),
voice profiles, the quota monitor and the remembered results are injected into it; :func:`build_voice_service`
assembles them from settings.
"""

from core.voice.backend import SEED_MAX, VoiceBackend, VoiceSettings
from core.voice.dictionaries import MAX_DICTIONARIES, PronunciationDictionary
from core.voice.elevenlabs import ElevenLabsBackend, Subscription
from core.voice.elevenlabs_faults import (
    BackoffPolicy,
    ElevenLabsError,
    ElevenLabsQuotaError,
    ElevenLabsRejectedError,
    ElevenLabsTimeoutError,
    ElevenLabsUnavailableError,
)
from core.voice.emotion import EMOTIONS, KNOWN_TAGS, Emotion, EmotionInjector, Expression
from core.voice.emotion_llm import LLMEmotionInjector
from core.voice.emotion_rules import RulesEmotionInjector
from core.voice.espeak import EspeakSynthesizer
from core.voice.factory import build_voice_service
from core.voice.formats import DEFAULT_OUTPUT_FORMAT, OUTPUT_FORMATS, OutputFormat, format_named
from core.voice.local import LocalVoiceBackend
from core.voice.models import ModelFacts, model_facts
from core.voice.mp3 import audio_duration, write_mp3
from core.voice.mp3join import join_mp3
from core.voice.profiles import VoiceProfile, VoiceProfiles
from core.voice.quota import QuotaMonitor
from core.voice.results import RememberedVoice, VoiceResults, voice_fingerprint
from core.voice.service import OnStream, VoiceJob, VoiceRequestLike, VoiceResult, VoiceService
from core.voice.streams import AudioSink, AudioStream, AudioStreams, StreamAborted
from core.voice.tags import strip_audio_tags
from core.voice.timing import Alignment, word_timings
from core.voice.turns import current_placement, queued_as

__all__ = [
    "DEFAULT_OUTPUT_FORMAT",
    "EMOTIONS",
    "KNOWN_TAGS",
    "MAX_DICTIONARIES",
    "OUTPUT_FORMATS",
    "SEED_MAX",
    "Alignment",
    "AudioSink",
    "AudioStream",
    "AudioStreams",
    "BackoffPolicy",
    "ElevenLabsBackend",
    "ElevenLabsError",
    "ElevenLabsQuotaError",
    "ElevenLabsRejectedError",
    "ElevenLabsTimeoutError",
    "ElevenLabsUnavailableError",
    "Emotion",
    "EmotionInjector",
    "EspeakSynthesizer",
    "Expression",
    "LLMEmotionInjector",
    "LocalVoiceBackend",
    "ModelFacts",
    "OnStream",
    "OutputFormat",
    "PronunciationDictionary",
    "QuotaMonitor",
    "RememberedVoice",
    "RulesEmotionInjector",
    "StreamAborted",
    "Subscription",
    "VoiceBackend",
    "VoiceJob",
    "VoiceProfile",
    "VoiceProfiles",
    "VoiceRequestLike",
    "VoiceResult",
    "VoiceResults",
    "VoiceService",
    "VoiceSettings",
    "audio_duration",
    "build_voice_service",
    "current_placement",
    "format_named",
    "join_mp3",
    "model_facts",
    "queued_as",
    "strip_audio_tags",
    "voice_fingerprint",
    "word_timings",
    "write_mp3",
]
