from collections.abc import AsyncIterator

import httpx
import pytest

from core.llm import ChatClient, LLMUnavailable
from tests.support.persona_server import PersonaLLMServer


@pytest.fixture
async def server() -> AsyncIterator[PersonaLLMServer]:
    s = PersonaLLMServer()
    await s.start()
    yield s
    await s.stop()


async def test_reply_is_the_completion_text(server: PersonaLLMServer) -> None:
    server.reply = lambda messages: "  a warm portrait  "
    async with httpx.AsyncClient() as http:
        client = ChatClient(http, server.url, "persona-7b", timeout=2)
        assert await client.complete("system", "user text") == "a warm portrait"
    sent = server.received[0]
    assert sent["model"] == "persona-7b"
    assert sent["messages"][-1] == {"role": "user", "content": "user text"}


@pytest.mark.parametrize("mode", ["error", "garbage", "empty", "slow"])
async def test_every_failure_is_llm_unavailable(server: PersonaLLMServer, mode: str) -> None:
    server.mode = mode
    async with httpx.AsyncClient() as http:
        client = ChatClient(http, server.url, "persona", timeout=0.3)
        with pytest.raises(LLMUnavailable):
            await client.complete("system", "user")


async def test_unreachable_is_llm_unavailable() -> None:
    async with httpx.AsyncClient() as http:
        client = ChatClient(http, "http://127.0.0.1:9", "persona", timeout=0.5)
        with pytest.raises(LLMUnavailable) as info:
            await client.complete("s", "u")
    assert info.value.retryable
