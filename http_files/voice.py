"""POST /generate/voice: the original API's request and response, on the voice core.

With ``Accept: audio/*`` (or any ``audio/…`` type: the audio is in the requested
``output_format`` whichever is named) the answer is the audio itself, streamed from its
first chunk (chunked, as ``GET`` on a ``stream_url`` serves it), with ``X-Request-Id`` and
``X-Stream-Url`` headers; a failure before any audio is the usual JSON error, one after it
cuts the response short (no final chunk). A request answered from the remembered results
(a replay) is its file (under the app's write deadline, as ``/outputs`` sends it), with
``X-Request-Id`` and ``X-Audio-Url`` (a 307 to that URL when the file is in the shared
store and not here). Otherwise the JSON result, once the file is complete.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Any

from aiohttp import web

from core.scheduling import PendingRequest
from core.voice import AudioStream, VoiceResult
from http_files.errors import error_response
from http_files.scheduled import run_scheduled
from http_files.sending import WRITE_TIMEOUT, TimedFileResponse
from http_files.services import SERVICES
from http_files.streams import send_stream
from http_files.validation import read_event
from schemas.errors import EngineError
from schemas.events import VoiceRequested

__all__ = ["generate_voice"]


def _wants_audio(request: web.Request) -> bool:
    """Whether ``Accept`` names an audio type, other than with ``q=0``."""
    for part in request.headers.get("Accept", "").split(","):
        kind, *params = (p.strip() for p in part.split(";"))
        refused = any(p.replace(" ", "") in ("q=0", "q=0.0", "q=0.00", "q=0.000")
                      for p in params)
        if kind.lower().startswith("audio/") and not refused:
            return True
    return False


def _file(request: web.Request, result: VoiceResult, request_id: str) -> web.StreamResponse:
    """``result``'s file as the answer to a request for audio: from here, else a redirect
    to its URL (in the shared store: any instance, or the store itself, serves it)."""
    store = request.app[SERVICES].store
    headers = {"X-Request-Id": request_id, "X-Audio-Url": result.url}
    path = store.resolve(result.filename)
    if path is None:
        return web.Response(status=307, headers={**headers, "Location": result.url})
    return TimedFileResponse(path, request.app[WRITE_TIMEOUT], headers={
        "Content-Type": store.content_type(result.filename), **headers})


def _as_json(result: VoiceResult) -> dict[str, Any]:
    body = asdict(result)
    body["words"] = None if result.words is None else [w.model_dump() for w in result.words]
    return body


async def generate_voice(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    event = await read_event(request, services.codec, VoiceRequested)
    voice = services.voice
    streaming = _wants_audio(request) and voice.streams is not None
    started: asyncio.Future[tuple[AudioStream, str]] = asyncio.get_running_loop().create_future()

    async def announce(stream: AudioStream, url: str) -> None:
        if not started.done():
            started.set_result((stream, url))

    async def speak(pending: PendingRequest) -> VoiceResult:
        pending.mark_started()
        return await voice.generate(event, on_stream=announce if streaming else None)

    if not streaming:
        try:
            result = await run_scheduled(services, "voice", event, speak)
        except EngineError as exc:
            return error_response(exc)
        return web.json_response(_as_json(result))

    work = asyncio.ensure_future(run_scheduled(services, "voice", event, speak))
    try:
        waited: set[asyncio.Future[Any]] = {work, started}
        await asyncio.wait(waited, return_when=asyncio.FIRST_COMPLETED)
        if not started.done():  # failed, or answered from the remembered results
            try:
                result = work.result()
            except EngineError as exc:
                return error_response(exc)
            return _file(request, result, event.request_id)
        stream, url = started.result()
        try:
            response = await send_stream(request, stream, {"X-Request-Id": event.request_id,
                                                           "X-Stream-Url": url})
        except ConnectionResetError:  # the requester stopped reading: reset, nothing to send
            return web.Response()  # (aiohttp drops it quietly on the closed connection)
        await asyncio.gather(work, return_exceptions=True)  # its outcome is in the stream
        return response
    finally:
        if not work.done():  # the client went away: the request stops too
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
