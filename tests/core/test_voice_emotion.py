"""Model-aware emotion injection: tags for v3, settings and punctuation elsewhere; the
Persona Engine's LLM when it answers well, the rules when it is slow, down or wrong."""

from __future__ import annotations

import httpx
import pytest
from pydantic import SecretStr

from core.llm import ChatClient
from core.outputs import OutputStore
from core.voice import (
    EMOTIONS,
    ElevenLabsBackend,
    EspeakSynthesizer,
    LLMEmotionInjector,
    LocalVoiceBackend,
    RulesEmotionInjector,
    VoiceJob,
    VoiceService,
    VoiceSettings,
)
from core.voice.emotion import shift_settings
from tests.support.elevenlabs_server import DEFAULT_KEY, ElevenLabsServer, RecordingSleep
from tests.support.persona_server import PersonaLLMServer

RACHEL = "21m00Tcm4TlvDq8ikWAM"
LINE = "I have a secret for you. Haha, you will love it!"


@pytest.fixture
def backend(http: httpx.AsyncClient, server: ElevenLabsServer) -> ElevenLabsBackend:
    return ElevenLabsBackend(http, server.api_url, SecretStr(DEFAULT_KEY), sleep=RecordingSleep())


def llm_injector(http: httpx.AsyncClient, llm: PersonaLLMServer, timeout: float = 2.0) -> LLMEmotionInjector:
    return LLMEmotionInjector(ChatClient(http, llm.url, "persona", timeout=timeout))


# --- the rules ---

RULES = RulesEmotionInjector()


@pytest.mark.parametrize(
    ("text", "tagged", "plain", "emotion"),
    [
        (LINE, "[whispers] I have a secret for you. [laughs] Haha, you will love it!",
         "I have a secret for you. Haha, you will love it!", "whispering"),
        ("I missed you so much 😢", "[sad] I missed you so much.", "I missed you so much.",
         "sad"),
        ("Ugh, what a day. I'm so tired.", "[sighs] Ugh, what a day. I'm so tired.",
         "Ugh, what a day... I'm so tired...", "sighing"),
        ("That is amazing. Yay!", "[excited] That is amazing. Yay!", "That is amazing! Yay!",
         "excited"),
        ("What are you doing tonight?", "[curious] What are you doing tonight?",
         "What are you doing tonight?", "curious"),
        ("*giggles* Stop it.", "[giggles] Stop it.", "Stop it!", "laughing"),
        ("See you at noon", "See you at noon.", "See you at noon.", None),
    ],
)
def test_rules_give_tags_to_v3_and_settings_and_punctuation_to_the_rest(
    text: str, tagged: str, plain: str, emotion: str | None
) -> None:
    with_tags = RULES.apply(text, performs_tags=True)
    without = RULES.apply(text, performs_tags=False)
    assert with_tags.text == tagged
    assert without.text == plain and "[" not in without.text
    assert (without.emotion.name if without.emotion else None) == emotion
    assert with_tags.source == without.source == "rules"


def test_rules_keep_existing_tags_and_never_repeat_one() -> None:
    result = RULES.apply("[warmly] Hi there. I love you. I love you too.", performs_tags=True)
    assert result.text == "[warmly] Hi there. I love you. I love you too."


def test_settings_shift_spares_what_the_request_set() -> None:
    base = VoiceSettings(RACHEL, stability=0.9, style=None)
    excited = EMOTIONS["excited"]
    shifted = shift_settings(base, excited)
    assert (shifted.stability, shifted.style, shifted.speed) == (0.7, 0.3, 1.08)
    kept = shift_settings(base, excited, keep=frozenset({"stability"}))
    assert kept.stability == 0.9 and kept.style == 0.3
    assert shift_settings(base, None) == base
    floor = shift_settings(VoiceSettings(RACHEL, stability=0.05), EMOTIONS["laughing"])
    assert floor.stability == 0.0


# --- through the service, per model ---


async def test_v3_gets_tags_and_its_settings_untouched(
    backend: ElevenLabsBackend, server: ElevenLabsServer, store: OutputStore
) -> None:
    result = await VoiceService(backend, store, RACHEL).generate(
        VoiceJob(LINE, model_id="eleven_v3"))
    (sent,) = server.tts_requests()
    assert sent.json["text"] == result.enhanced_text
    assert result.enhanced_text.startswith("[whispers] I have a secret")
    assert "voice_settings" not in sent.json


async def test_other_models_get_no_tags_but_shifted_settings(
    backend: ElevenLabsBackend, server: ElevenLabsServer, store: OutputStore
) -> None:
    service = VoiceService(backend, store, RACHEL)
    result = await service.generate(VoiceJob("[laughs] Haha, that's hilarious.", stability=0.6,
                                             model_id="eleven_flash_v2_5"))
    (sent,) = server.tts_requests()
    assert sent.json["text"] == result.enhanced_text == "Haha, that's hilarious!"
    laughing = EMOTIONS["laughing"]
    assert sent.json["voice_settings"] == {  # stability was the request's own: kept
        "stability": 0.6, "style": laughing.style, "speed": laughing.speed}


async def test_inject_emotion_false_sends_the_text_as_given_minus_tags_where_unperformed(
    backend: ElevenLabsBackend, server: ElevenLabsServer, store: OutputStore
) -> None:
    service = VoiceService(backend, store, RACHEL)
    text = "[sighs] ugh, fine 😒"
    v3 = await service.generate(VoiceJob(text, model_id="eleven_v3", inject_emotion=False))
    v2 = await service.generate(VoiceJob(text, inject_emotion=False))
    assert [r.json["text"] for r in server.tts_requests()] == [text, "ugh, fine 😒"]
    assert (v3.enhanced_text, v2.enhanced_text) == (text, "ugh, fine 😒")
    assert all("voice_settings" not in r.json for r in server.tts_requests())


async def test_the_local_engine_never_hears_a_tag(store: OutputStore) -> None:
    service = VoiceService(LocalVoiceBackend(EspeakSynthesizer()), store, RACHEL)
    result = await service.generate(VoiceJob("Haha, you're silly. I missed you 🥰",
                                             model_id="eleven_v3"))
    assert "[" not in result.enhanced_text and "🥰" not in result.enhanced_text
    assert result.enhanced_text == "Haha, you're silly! I missed you."


# --- the LLM ---


async def test_a_valid_llm_rewrite_is_spoken(
    http: httpx.AsyncClient, llm: PersonaLLMServer, backend: ElevenLabsBackend,
    server: ElevenLabsServer, store: OutputStore,
) -> None:
    llm.reply = lambda messages: "[mischievously] I have a secret for you... [laughs] Haha, you will love it!"
    service = VoiceService(backend, store, RACHEL, llm_injector(http, llm))
    result = await service.generate(VoiceJob(LINE, model_id="eleven_v3"))
    assert result.enhanced_text == (
        "[mischievously] I have a secret for you... [laughs] Haha, you will love it!")
    assert server.tts_requests()[0].json["text"] == result.enhanced_text
    assert llm.received[0]["messages"][-1]["content"] == LINE
    assert "[warmly]" in llm.received[0]["messages"][0]["content"]  # the allowed tags


@pytest.mark.parametrize(
    "reply",
    [
        "[whispers] I have a big secret for you. [laughs] Haha, you will love it!",  # word added
        "[dances] I have a secret for you. Haha, you will love it!",  # unknown tag
        "Sure! Here is the line: [whispers] I have a secret for you.",  # chatter, words lost
    ],
)
async def test_an_llm_rewrite_that_changes_words_or_invents_tags_falls_back_to_rules(
    http: httpx.AsyncClient, llm: PersonaLLMServer, reply: str
) -> None:
    llm.reply = lambda messages: reply
    result = await llm_injector(http, llm).express(LINE, performs_tags=True)
    assert result == RULES.apply(LINE, performs_tags=True)


@pytest.mark.parametrize("mode", ["slow", "error", "garbage", "down"])
async def test_a_slow_or_broken_llm_falls_back_to_rules(
    http: httpx.AsyncClient, llm: PersonaLLMServer, mode: str
) -> None:
    if mode == "down":
        injector = LLMEmotionInjector(ChatClient(http, "http://127.0.0.1:9", "persona", 0.5))
    else:
        llm.mode = mode
        injector = llm_injector(http, llm, timeout=0.15)
    for performs_tags in (True, False):
        result = await injector.express(LINE, performs_tags)
        assert result == RULES.apply(LINE, performs_tags)


async def test_for_untagged_models_the_llm_names_the_emotion(
    http: httpx.AsyncClient, llm: PersonaLLMServer, backend: ElevenLabsBackend,
    server: ElevenLabsServer, store: OutputStore,
) -> None:
    llm.reply = lambda messages: "Sad."
    service = VoiceService(backend, store, RACHEL, llm_injector(http, llm))
    result = await service.generate(VoiceJob("Well, it is what it is."))
    sad = EMOTIONS["sad"]
    assert result.enhanced_text == "Well, it is what it is."
    assert server.tts_requests()[0].json["voice_settings"] == {
        "stability": 0.5 + sad.stability, "style": sad.style, "speed": sad.speed}

    llm.reply = lambda messages: "melancholic"  # not an emotion it knows: the rules
    expression = await llm_injector(http, llm).express("Fine.", performs_tags=False)
    assert expression.source == "rules"


async def test_long_texts_skip_the_llm(http: httpx.AsyncClient, llm: PersonaLLMServer) -> None:
    injector = LLMEmotionInjector(ChatClient(http, llm.url, "persona"), max_chars=20)
    await injector.express(LINE, performs_tags=True)
    assert llm.received == []
