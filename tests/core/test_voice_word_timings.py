"""Word timings at scale and across a fleet: the timings file holds every character, so
reading it back matches nothing; the words of a long text take linear time (a quadratic
match of 20,000 characters took most of a minute); a replay answered by another instance
of the fleet reads the timings file through the shared store and has the same words."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
from pydantic import SecretStr

from core.outputs import OutputStore
from core.remembered import RememberedResults
from core.settings import load_settings
from core.storage import SharedOutputs, build_object_store
from core.voice import ElevenLabsBackend, VoiceJob, VoiceService
from core.voice.results import VoiceResults
from core.voice.timing import Alignment, word_timings
from tests.support.elevenlabs_server import DEFAULT_KEY, ElevenLabsServer
from tests.support.s3_server import StoreLocation

RACHEL = "21m00Tcm4TlvDq8ikWAM"
SENTENCE = "Well, this is a sentence with words in it! And more, said she; a lot more. "


def local_style(chars: int) -> Alignment:
    """Like the local voice's: each word's characters timed, blanks and punctuation not."""
    text = (SENTENCE * (chars // len(SENTENCE) + 1))[:chars]
    starts: list[float | None] = [None] * len(text)
    ends: list[float | None] = [None] * len(text)
    for n, word in enumerate(re.finditer(r"\w+", text)):
        for k in range(word.start(), word.end()):
            starts[k], ends[k] = n * 0.25, n * 0.25 + 0.2
    return Alignment(text, tuple(starts), tuple(ends))


def only_timed(alignment: Alignment) -> tuple[list[str], list[float], list[float]]:
    """The characters with a time, as the timings files of earlier versions held them."""
    kept = [i for i, s in enumerate(alignment.starts) if s is not None]
    return ([alignment.text[i] for i in kept], [alignment.starts[i] or 0.0 for i in kept],
            [alignment.ends[i] or 0.0 for i in kept])


def test_the_timings_file_holds_every_character_and_reads_back_unchanged() -> None:
    alignment = local_style(20_000)
    raw = json.loads(json.dumps(alignment.as_json()))
    assert "".join(raw["characters"]) == alignment.text
    assert raw["character_start_times_seconds"][5] is None  # the blank after "Well,"
    read = Alignment.of_characters(alignment.text, raw["characters"],
                                   raw["character_start_times_seconds"],
                                   raw["character_end_times_seconds"])
    assert read == alignment


def test_the_words_of_a_long_text_take_linear_time() -> None:
    def seconds(chars: int) -> float:
        alignment = local_style(chars)
        spelled = only_timed(alignment)  # an earlier file: matched in order
        best = float("inf")
        for _ in range(3):
            began = time.perf_counter()
            read = Alignment.of_characters(alignment.text, *spelled)
            words = word_timings(alignment.text, read)
            best = min(best, time.perf_counter() - began)
        assert read == alignment
        assert [w.word for w in words] == re.findall(r"\w+", alignment.text)
        return best

    small, large = seconds(5_000), seconds(20_000)
    assert large < 2.0  # a character-level quadratic match: ~55 s
    assert large < 8 * small  # 4 times the text: ~4 times the time, not ~16


def test_words_match_in_order_past_added_and_changed_words() -> None:
    spoken = "Oh, well I am so very fine today, truly, and you?"
    starts = tuple(float(i) / 10 for i in range(len(spoken)))
    alignment = Alignment(spoken, starts, tuple(s + 0.05 for s in starts))
    words = word_timings("I am fine today and how are you?", alignment)
    assert [w.word for w in words] == ["I", "am", "fine", "today", "and", "how", "are", "you"]
    by_word = {w.word: w for w in words}
    for word in ("I", "am", "fine", "today", "and", "you"):
        at = re.search(rf"\b{word}\b", spoken)
        assert at is not None and by_word[word].start == round(starts[at.start()], 4)
    starts_in_order = [w.start for w in words]
    assert starts_in_order == sorted(starts_in_order)


async def test_a_replay_on_another_instance_of_the_fleet_has_the_same_words(
    server: ElevenLabsServer, http: httpx.AsyncClient, s3_store: StoreLocation, tmp_path: Path
) -> None:
    objects = build_object_store(load_settings(storage_url=s3_store.url,
                                               storage_endpoint_url=s3_store.endpoint))
    assert objects is not None

    def instance(name: str) -> VoiceService:
        backend = ElevenLabsBackend(http, server.api_url, SecretStr(DEFAULT_KEY),
                                    timeout=httpx.Timeout(5.0))
        store = OutputStore(tmp_path / name / "outputs", shared=SharedOutputs(objects))
        results = VoiceResults(RememberedResults(tmp_path / name / "results", shared=objects,
                                                 namespace="results/voice"))
        return VoiceService(backend, store, RACHEL, results=results)

    job = VoiceJob("Hello there, my friend. It is good to hear you again!",
                   inject_emotion=False, seed=7)
    first = await instance("a").generate(job)
    again = await instance("b").generate(job)
    assert server.tts_calls == 1  # the replay cost nothing
    assert first.words is not None and len(first.words) == 11
    assert again.words == first.words and again.alignment_url == first.alignment_url
