"""A local Persona Engine LLM: a real aiohttp server on 127.0.0.1 speaking the
OpenAI-compatible chat completions API, with behaviours a test can switch.

Modes: ``ok`` (answers ``reply(messages)``), ``slow`` (answers after ``delay`` seconds),
``error`` (HTTP 500), ``garbage`` (200 with a body that is no completion), ``empty``
(a completion with empty content). Every request body is logged in ``received``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aiohttp import web

__all__ = ["PersonaLLMServer"]


def _echo(messages: list[dict[str, str]]) -> str:
    return messages[-1]["content"]


class PersonaLLMServer:
    def __init__(self) -> None:
        self.mode = "ok"
        self.delay = 5.0
        self.reply: Callable[[list[dict[str, str]]], str] = _echo
        self.received: list[dict[str, Any]] = []
        self._runner: web.AppRunner | None = None
        self.url = ""
        self._release = asyncio.Event()

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.received.append(body)
        if self.mode == "slow":
            try:
                await asyncio.wait_for(self._release.wait(), self.delay)
            except TimeoutError:
                pass
        if self.mode == "error":
            return web.json_response({"error": {"message": "model crashed"}}, status=500)
        if self.mode == "garbage":
            return web.Response(text="<html>502 Bad Gateway</html>", content_type="text/html")
        content = "" if self.mode == "empty" else self.reply(body["messages"])
        return web.json_response({
            "id": "chatcmpl-test", "object": "chat.completion", "model": body.get("model"),
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": content}}],
        })

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self.url

    async def stop(self) -> None:
        self._release.set()  # let slow handlers finish before the server goes
        if self._runner is not None:
            await self._runner.cleanup()
