"""Text as callers write it, through tags, splitting, emotion and word timings: a caller's
bracketed words are spoken, only audio tags are taken out; long text in a script without
spaces is split at its own sentence ends, a tag never cut nor parted from its text, in
linear time; Japanese words are timed character by character; full-width punctuation ends
a sentence; and on v3 every part of a long text starts in the mood it is in. Against the
local ElevenLabs and the local voice where the whole path matters."""

from __future__ import annotations

import random
import re
import time
import unicodedata

import httpx
import pytest
from pydantic import SecretStr

from core.outputs import OutputStore
from core.voice import (
    KNOWN_TAGS,
    BackoffPolicy,
    ElevenLabsBackend,
    EspeakSynthesizer,
    LocalVoiceBackend,
    VoiceJob,
    VoiceResult,
    VoiceService,
    strip_audio_tags,
)
from core.voice.chunking import split_text
from core.voice.emotion_rules import RulesEmotionInjector
from core.voice.tags import MOOD_TAGS, moods_in_force
from core.voice.timing import Alignment, word_timings
from tests.support.elevenlabs_server import DEFAULT_KEY, ElevenLabsServer, RecordingSleep

RACHEL = "21m00Tcm4TlvDq8ikWAM"
BRACKETED = "Meet me at [Central Park] tomorrow, and bring [Anna]."
JAPANESE = "今日はとても楽しかったです。また明日会いましょうね。"
SENTENCE_JA = "今日はとても楽しかったです。"  # 14 characters, no spaces
V3_CHUNK = 2_000  # what the engine sends v3 in one request


def service(http: httpx.AsyncClient, server: ElevenLabsServer, store: OutputStore
            ) -> VoiceService:
    backend = ElevenLabsBackend(http, server.api_url, SecretStr(DEFAULT_KEY),
                                sleep=RecordingSleep(), retry=BackoffPolicy(rng=random.Random(1)))
    return VoiceService(backend, store, RACHEL, max_text_chars=60_000)


def assert_words_are_the_callers(text: str, result: VoiceResult, expected: list[str]) -> None:
    """``result.words`` are ``expected``, each at its place in ``text``, in time order."""
    assert result.words is not None
    assert [w.word for w in result.words] == expected
    assert all(text[w.char_start:w.char_end] == w.word for w in result.words)
    starts = [w.start for w in result.words]
    assert starts == sorted(starts)
    assert result.words[-1].end <= result.duration_seconds + 0.01


# --- 1. a caller's brackets are text; only audio tags are taken out ---


def test_only_audio_tags_are_stripped_and_other_brackets_keep_their_words() -> None:
    assert strip_audio_tags(BRACKETED) == BRACKETED
    assert strip_audio_tags("[Laughs] Bring [Anna] [ whispers  softly ]now.") == \
        "Bring [Anna] now."
    assert strip_audio_tags("Hi [sighs]! See you at [noon].") == "Hi! See you at [noon]."


@pytest.mark.parametrize("model_id", ["eleven_multilingual_v2", "eleven_v3"])
@pytest.mark.parametrize("inject_emotion", [False, True])
async def test_a_callers_bracketed_words_are_sent_and_timed(
    http: httpx.AsyncClient, server: ElevenLabsServer, store: OutputStore, model_id: str,
    inject_emotion: bool
) -> None:
    text = f"[laughs] {BRACKETED}"
    result = await service(http, server, store).generate(
        VoiceJob(text, model_id=model_id, inject_emotion=inject_emotion, seed=3))
    (sent,) = server.tts_requests()
    assert sent.json["text"] == result.enhanced_text
    assert "[Central Park]" in sent.json["text"] and "[Anna]" in sent.json["text"]
    assert ("[laughs]" in sent.json["text"]) == (model_id == "eleven_v3")
    assert_words_are_the_callers(text, result, ["Meet", "me", "at", "Central", "Park",
                                                "tomorrow", "and", "bring", "Anna"])


async def test_the_local_voice_speaks_a_callers_bracketed_words(store: OutputStore) -> None:
    local = VoiceService(LocalVoiceBackend(EspeakSynthesizer()), store, RACHEL)
    result = await local.generate(VoiceJob(f"[whispers] {BRACKETED}", inject_emotion=False))
    assert result.enhanced_text == BRACKETED
    assert_words_are_the_callers(f"[whispers] {BRACKETED}", result, [
        "Meet", "me", "at", "Central", "Park", "tomorrow", "and", "bring", "Anna"])
    by_word = {w.word: w for w in result.words or []}
    assert by_word["Park"].start > by_word["Central"].start > by_word["at"].start


# --- 2. splitting long text ---


def test_text_without_spaces_is_split_at_its_sentence_ends_a_leading_tag_kept_with_it() -> None:
    text = "[whispers] " + SENTENCE_JA * 150  # 2,111 characters
    chunks = split_text(text, V3_CHUNK)
    assert [len(c) for c in chunks] == [11 + 14 * 142, 14 * 8]
    assert chunks[0].startswith("[whispers] 今日は")
    assert all(c.endswith("。") for c in chunks)


def test_a_tag_is_never_cut_and_starts_the_chunk_it_colours() -> None:
    text = SENTENCE_JA * 142 + "[whispers softly] " + SENTENCE_JA * 10
    chunks = split_text(text, V3_CHUNK)
    assert chunks == [SENTENCE_JA * 142, "[whispers softly] " + SENTENCE_JA * 10]
    run = "[sad] " + "あ" * 3_000  # nothing to cut at: the tag stays with the run
    assert [c[:8] for c in split_text(run, V3_CHUNK)] == ["[sad] ああ", "ああああああああ"]


def test_full_width_clause_punctuation_then_characters_without_parting_graphemes() -> None:
    clauses = "とても楽しかった、" * 300  # no sentence end at all
    chunks = split_text(clauses, V3_CHUNK)
    assert all(c.endswith("、") for c in chunks[:-1]) and "".join(chunks) == clauses
    accented = "e\u0301" * 1_500  # é as e + combining acute: 3,000 characters, no gaps
    parts = split_text(accented, V3_CHUNK)
    assert "".join(parts) == accented
    assert all(unicodedata.category(p[0]) != "Mn" for p in parts)


def test_an_emoticon_bracket_leaves_word_splitting_on() -> None:
    text = "and so many more loving words " * 100 + "see you :]"  # no punctuation to cut at
    chunks = split_text(text, 1_000)
    assert len(chunks) > 1
    assert [w for c in chunks for w in c.split()] == text.split()  # no word cut in two


def test_splitting_takes_linear_time() -> None:
    # CPU time of this thread, not the wall clock: other processes on a busy machine take
    # the cores, not this thread's work; the ratio of two sizes is what tells linear from
    # quadratic (speed itself is for bench/)
    def seconds(text: str) -> float:
        best = float("inf")
        for _ in range(3):
            began = time.thread_time()
            split_text(text, V3_CHUNK)
            best = min(best, time.thread_time() - began)
        return best

    words = "lovely words without any punctuation at all "
    small, large = seconds(words * 250), seconds(words * 1_000)  # ~11,000 and ~44,000
    assert large < 8 * small  # 4 times the text: ~4 times the time; the look-ahead it replaced ~16


# --- 3. words of a script without spaces ---


def test_each_character_of_a_script_without_spaces_is_a_word() -> None:
    thai = "สวัสดีครับ"  # with combining vowel marks, which stay with their letter
    alignment = Alignment(thai, tuple(float(i) for i in range(len(thai))),
                          tuple(float(i) + 1 for i in range(len(thai))))
    assert [w.word for w in word_timings(thai, alignment)] == ["ส", "วั", "ส", "ดี", "ค", "รั",
                                                               "บ"]
    hindi = "नमस्ते दुनिया"  # spaced: whole words, marks included
    alignment = Alignment(hindi, (0.0,) * len(hindi), (1.0,) * len(hindi))
    assert [w.word for w in word_timings(hindi, alignment)] == ["नमस्ते", "दुनिया"]


async def test_japanese_words_are_timed_character_by_character(
    http: httpx.AsyncClient, server: ElevenLabsServer, store: OutputStore
) -> None:
    result = await service(http, server, store).generate(VoiceJob(JAPANESE, seed=1))
    kana_and_kanji = [c for c in JAPANESE if c != "。"]
    assert_words_are_the_callers(JAPANESE, result, kana_and_kanji)
    assert len({w.start for w in result.words or []}) == len(kana_and_kanji)  # each its own


# --- 4. full-width sentence ends ---


@pytest.mark.parametrize("performs_tags", [False, True])
def test_full_width_punctuation_ends_a_sentence(performs_tags: bool) -> None:
    rules = RulesEmotionInjector()
    assert rules.apply(JAPANESE, performs_tags).text == JAPANESE
    assert rules.apply("本当？すごい！", performs_tags).text == "本当？すごい！"
    assert rules.apply("また明日", performs_tags).text == "また明日。"


async def test_japanese_is_sent_as_written(
    http: httpx.AsyncClient, server: ElevenLabsServer, store: OutputStore
) -> None:
    result = await service(http, server, store).generate(VoiceJob(JAPANESE, seed=1))
    (sent,) = server.tts_requests()
    assert sent.json["text"] == result.enhanced_text == JAPANESE


# --- 5. v3: every part starts in the mood it is in ---


def test_the_mood_in_force_is_the_last_mood_tag_before_a_part() -> None:
    assert MOOD_TAGS <= KNOWN_TAGS
    parts = ["[sad] I miss you. [laughs] Haha.", "Still here.", "[warmly] Hi.", "Bye [sighs].",
             "[laughs] Ha.", "Ok."]
    assert moods_in_force(parts) == [None, "[sad]", None, "[warmly]", None, "[warmly]"]


async def test_each_v3_part_starts_with_the_mood_it_is_in(
    http: httpx.AsyncClient, server: ElevenLabsServer, store: OutputStore
) -> None:
    server.seconds_per_char = 0.0005
    sentence = "I keep thinking about the evening we spent by the river last spring. "
    text = ("[sad] " + sentence * 80 + "[laughs] Haha, what a night that was. "
            + sentence * 30).strip()  # 4 parts, the third with the laugh inside
    result = await service(http, server, store).generate(
        VoiceJob(text, model_id="eleven_v3", inject_emotion=False, seed=2))

    sent = [r.json["text"] for r in sorted(server.tts_requests(), key=lambda r: r.json["text"])]
    assert len(sent) == 4 and all(part.startswith("[sad] I keep") for part in sent)
    assert sum(part.count("[laughs]") for part in sent) == 1  # a sound is made once
    assert result.enhanced_text == text  # the text as given: the tag once, where it was
    expected = re.findall(r"\w+(?:'\w+)*", strip_audio_tags(text))
    assert_words_are_the_callers(text, result, expected)
