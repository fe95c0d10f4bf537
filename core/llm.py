"""The Persona Engine's LLM, through the OpenAI-compatible chat completions API.

``POST {PERSONA_ENGINE_URL}/v1/chat/completions`` is what vLLM, Ollama and llama.cpp
servers speak. Callers (prompt optimization, emotion injection) use it with a short
timeout and fall back to deterministic rules on any :class:`LLMUnavailable`.

Each call is bounded as a whole, not only each network read: its ``timeout``
(PERSONA_ENGINE_TIMEOUT) is the deadline for the answer, body included, so an LLM that
drips its answer is cut off; and a reply longer than :data:`MAX_REPLY_BYTES` is refused
unread past that bound (a prompt or a tagged line is short).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import httpx

from core.net.bounded import BodyTooLarge, read_capped
from schemas.errors import UpstreamUnavailableError

__all__ = ["MAX_REPLY_BYTES", "ChatClient", "LLMUnavailable"]

logger = logging.getLogger(__name__)

MAX_REPLY_BYTES = 256 * 1024
"""The longest reply body read: far above any completion asked for here (``max_tokens``
of a few hundred), far below what would weigh on the engine's memory."""


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

        Raises :class:`LLMUnavailable` when no whole answer came within the timeout, on a
        connection error, a non-2xx status, a body over :data:`MAX_REPLY_BYTES`, or one
        without a non-empty ``choices[0].message.content``.
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
            async with asyncio.timeout(self._timeout):
                async with self._client.stream("POST", self._url, json=payload,
                                               timeout=self._timeout) as response:
                    if response.status_code >= 300:
                        raise LLMUnavailable(f"LLM answered HTTP {response.status_code}")
                    body = await read_capped(response, MAX_REPLY_BYTES, seconds=None)
        except (TimeoutError, httpx.TimeoutException) as exc:
            logger.warning("LLM gave no whole answer within %ss", self._timeout)
            raise LLMUnavailable(f"LLM did not answer within {self._timeout}s") from exc
        except BodyTooLarge as exc:
            logger.warning("LLM answered more than %d bytes; its answer is dropped",
                           MAX_REPLY_BYTES)
            raise LLMUnavailable(f"LLM answered more than {MAX_REPLY_BYTES} bytes") from exc
        except httpx.HTTPError as exc:
            logger.info("LLM unreachable: %s", type(exc).__name__)
            raise LLMUnavailable("LLM unreachable") from exc
        try:
            content = json.loads(body)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise LLMUnavailable("LLM answered something that is not a chat completion") from exc
        if not isinstance(content, str) or not content.strip():
            raise LLMUnavailable("LLM answered an empty completion")
        return content.strip()
