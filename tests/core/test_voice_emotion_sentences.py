"""The emotion rules pick a text's last stop by the scripts the splitter knows
(:data:`core.voice.chunking.CJK_SCRIPTS`): Chinese or Japanese in any of its forms (half-width
katakana, the rarer kanji included) ends with ``。``, the other scripts written without
spaces, and the rest, with ``.``."""

from __future__ import annotations

import pytest

from core.voice.emotion_rules import RulesEmotionInjector


@pytest.mark.parametrize(("text", "stop"), [
    ("また明日", "。"),
    ("ｱﾘｶﾞﾄｳ", "。"),  # half-width katakana
    ("ㇰㇱ", "。"),  # katakana phonetic extensions
    ("吉野𠮷", "。"),  # ending in a kanji beyond the basic block (U+20BB7)
    ("สวัสดี", "."),  # Thai: no spaces between words, but no 。
    ("see you", "."),
])
@pytest.mark.parametrize("performs_tags", [False, True])
def test_the_last_stop_follows_the_script(text: str, stop: str, performs_tags: bool) -> None:
    assert RulesEmotionInjector().apply(text, performs_tags).text == text + stop

