"""The Persona Engine's LLM, through the OpenAI-compatible chat completions API.

``POST {PERSONA_ENGINE_URL}/v1/chat/completions`` is what vLLM, Ollama and llama.cpp
servers speak. Callers (prompt optimization, emotion injection) use it with a short
timeout and fall back to deterministic rules on any :class:`LLMUnavailable`.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx

from schemas.errors import UpstreamUnavailableError

__all__ = ["ChatClient", "LLMUnavailable"]

logger = logging.getLogger(__name__)


class LLMUnavailable(UpstreamUnavailableError):
    """The LLM was slow, down, or answered something that is not a completion."""


class ChatClient:
    """One chat model behind an OpenAI-compatible endpoint, on a shared httpx client."""

    def __init__(
        self, client: httpx.AsyncClient, base_url: str, model: str, timeout: float = 2.0
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        self._client = client
        self._url = base_url.rstrip("/") + "/v1/chat/completions"
        self._model = model
        self._timeout = timeout

    async def complete(
        self, system: str, user: str, *, max_tokens: int = 256, temperature: float = 0.2
    ) -> str:
        """The assistant's reply text, stripped.

        Raises :class:`LLMUnavailable` on a timeout, a connection error, a non-2xx status,
        or a body without a non-empty ``choices[0].message.content``.
        """
        payload: dict[str, Any] = {
            "model": self._model,
            "messages": [{"role": "system", "content": system},
                         {"role": "user", "content": user}],
            "max_tokens": max_tokens,
            "temperature": temperature,
            "stream": False,
        }
        try:
            response = await self._client.post(self._url, json=payload, timeout=self._timeout)
        except httpx.TimeoutException as exc:
            raise LLMUnavailable(f"LLM did not answer within {self._timeout}s") from exc
        except httpx.HTTPError as exc:
            raise LLMUnavailable(f"LLM unreachable: {type(exc).__name__}") from exc
        if response.status_code >= 300:
            raise LLMUnavailable(f"LLM answered HTTP {response.status_code}")
        try:
            content = response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise LLMUnavailable("LLM answered something that is not a chat completion") from exc
        if not isinstance(content, str) or not content.strip():
            raise LLMUnavailable("LLM answered an empty completion")
        return content.strip()
