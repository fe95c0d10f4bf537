"""The Persona LLM client bounds each call as a whole: PERSONA_ENGINE_TIMEOUT is the
deadline for the answer body included (a server dripping its answer is cut off), and a
reply past MAX_REPLY_BYTES is refused without reading the rest; the callers then fall back
to their rules, as for any LLMUnavailable."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from core.image.prompts import PromptOptimizer, rules_prompt
from core.llm import MAX_REPLY_BYTES, ChatClient, LLMUnavailable
from tests.support.hostile_http import HostileServer

COMPLETION_START = b'{"choices": [{"message": {"content": "'
COMPLETION_END = b'"}}]}'
OUTER = 10  # seconds: far beyond every bound under test; reaching it is the failure


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


@pytest.fixture
async def drip() -> AsyncIterator[HostileServer]:
    async with HostileServer("drip", start=COMPLETION_START) as server:
        yield server


@pytest.fixture
async def flood() -> AsyncIterator[HostileServer]:
    async with HostileServer("flood", start=COMPLETION_START, end=COMPLETION_END,
                             flood_bytes=64 * 2**20) as server:
        yield server


async def test_a_dripping_answer_is_cut_off_at_the_timeout(
        http: httpx.AsyncClient, drip: HostileServer) -> None:
    client = ChatClient(http, drip.url, "persona", timeout=0.5)
    started = time.monotonic()
    async with asyncio.timeout(OUTER):
        with pytest.raises(LLMUnavailable) as caught:
            await client.complete("system", "user")
    assert time.monotonic() - started < 0.5 + 1.0
    assert caught.value.retryable and "0.5s" in caught.value.message
    assert await asyncio.wait_for(drip.outcomes.get(), OUTER) == "cut"


async def test_an_oversized_answer_is_refused_unread(
        http: httpx.AsyncClient, flood: HostileServer) -> None:
    client = ChatClient(http, flood.url, "persona", timeout=5.0)
    async with asyncio.timeout(OUTER):
        with pytest.raises(LLMUnavailable) as caught:
            await client.complete("system", "user")
    assert str(MAX_REPLY_BYTES) in caught.value.message
    assert await asyncio.wait_for(flood.outcomes.get(), OUTER) == "cut"  # not read to its end


async def test_an_answer_just_within_the_bound_is_taken(http: httpx.AsyncClient) -> None:
    content = "a" * (MAX_REPLY_BYTES - 1024)
    body = json.dumps({"choices": [{"message": {"content": content}}]}).encode()
    async with HostileServer("flood", start=body) as server:
        client = ChatClient(http, server.url, "persona", timeout=5.0)
        assert await client.complete("system", "user") == content


async def test_prompt_optimization_falls_back_to_the_rules_on_a_drip(
        http: httpx.AsyncClient, drip: HostileServer) -> None:
    optimizer = PromptOptimizer(ChatClient(http, drip.url, "persona", timeout=0.5))
    async with asyncio.timeout(OUTER):
        optimized = await optimizer.optimize("a cat", None, enabled=True)
    assert optimized.source == "rules" and optimized.prompt == rules_prompt("a cat", None)
