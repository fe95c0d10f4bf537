"""Real local upstreams and clients shared by the core tests (each test gets its own)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from core.outputs import OutputStore
from tests.support.elevenlabs_server import ElevenLabsServer
from tests.support.persona_server import PersonaLLMServer


@pytest.fixture
async def server() -> AsyncIterator[ElevenLabsServer]:
    """A local ElevenLabs making short audio (4 ms per character) for fast tests."""
    s = ElevenLabsServer(seconds_per_char=0.004)
    await s.start()
    yield s
    await s.stop()


@pytest.fixture
async def llm() -> AsyncIterator[PersonaLLMServer]:
    s = PersonaLLMServer()
    await s.start()
    yield s
    await s.stop()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


@pytest.fixture
def store(tmp_path: Path) -> OutputStore:
    return OutputStore(tmp_path / "outputs")
