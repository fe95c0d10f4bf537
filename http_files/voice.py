"""POST /generate/voice: the original API's request and response, on the voice core."""

from __future__ import annotations

from dataclasses import asdict

from aiohttp import web

from core.scheduling import PendingRequest
from core.voice import VoiceResult
from http_files.errors import error_response
from http_files.scheduled import run_scheduled
from http_files.services import SERVICES
from http_files.validation import read_event
from schemas.errors import EngineError
from schemas.events import VoiceRequested

__all__ = ["generate_voice"]


async def generate_voice(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    event = await read_event(request, services.codec, VoiceRequested)
    voice = services.voice

    async def speak(pending: PendingRequest) -> VoiceResult:
        pending.mark_started()
        return await voice.generate(event)

    try:
        result = await run_scheduled(services, "voice", event, speak)
    except EngineError as exc:
        return error_response(exc)
    return web.json_response(asdict(result))
