"""Prompt optimization against a real local LLM server: LLM first, rules as fallback,
the trigger word always kept."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from core.image.prompts import PromptOptimizer, rules_prompt, with_trigger
from core.llm import ChatClient
from tests.support.persona_server import PersonaLLMServer


@pytest.fixture
async def server() -> AsyncIterator[PersonaLLMServer]:
    s = PersonaLLMServer()
    await s.start()
    yield s
    await s.stop()


@pytest.fixture
async def optimizer(server: PersonaLLMServer) -> AsyncIterator[PromptOptimizer]:
    async with httpx.AsyncClient() as http:
        yield PromptOptimizer(ChatClient(http, server.url, "persona", timeout=0.3))


def test_rules_add_style_quality_and_trigger() -> None:
    prompt = rules_prompt("portrait of a woman in a cafe", "sarah")
    assert prompt.startswith("sarah, portrait of a woman in a cafe")
    assert "85mm" in prompt and "highly detailed" in prompt
    assert rules_prompt("sarah at the beach", "sarah").count("sarah") == 1


def test_trigger_word_matches_whole_words_only() -> None:
    assert with_trigger("sarahs cat", "sarah") == "sarah, sarahs cat"
    assert with_trigger("Sarah smiling", "sarah") == "Sarah smiling"


async def test_llm_answer_is_used_when_it_keeps_the_trigger(
    server: PersonaLLMServer, optimizer: PromptOptimizer
) -> None:
    server.reply = lambda messages: "sarah, cinematic portrait in soft window light, 50mm"
    result = await optimizer.optimize("sarah in a cafe", "sarah", enabled=True)
    assert result.source == "llm"
    assert result.prompt == "sarah, cinematic portrait in soft window light, 50mm"
    assert "sarah" in server.received[0]["messages"][0]["content"]


@pytest.mark.parametrize("mode", ["slow", "error", "garbage", "empty"])
async def test_llm_trouble_falls_back_to_rules(
    server: PersonaLLMServer, optimizer: PromptOptimizer, mode: str
) -> None:
    server.mode = mode
    result = await optimizer.optimize("portrait in a cafe", "sarah", enabled=True)
    assert result.source == "rules"
    assert result.prompt == rules_prompt("portrait in a cafe", "sarah")


async def test_llm_dropping_the_trigger_word_falls_back_to_rules(
    server: PersonaLLMServer, optimizer: PromptOptimizer
) -> None:
    server.reply = lambda messages: "a woman in a cafe, cinematic lighting"
    result = await optimizer.optimize("portrait in a cafe", "sarah", enabled=True)
    assert result.source == "rules" and result.prompt.startswith("sarah, ")


async def test_disabled_keeps_the_prompt_plus_trigger(optimizer: PromptOptimizer,
                                                      server: PersonaLLMServer) -> None:
    result = await optimizer.optimize("in a cafe", "sarah", enabled=False)
    assert (result.prompt, result.source) == ("sarah, in a cafe", "as_given")
    assert server.received == []


async def test_without_llm_rules_apply() -> None:
    result = await PromptOptimizer(None).optimize("mountain sunset", None, enabled=True)
    assert result.source == "rules" and "landscape" in result.prompt
