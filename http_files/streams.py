"""GET /streams/voice/{instance}/{stream_id}: a voice request's audio while it is made.

Chunked: the bytes so far at once, then the rest as they arrive; the response ends when
the audio is complete. A stream that fails or is cancelled ends the response without its
last chunk (the connection closes), so a player never takes half the audio for all of it.
A stream lives on the instance making it: another instance's name answers 404 saying
which instance has it (README, "Streaming voice").
"""

from __future__ import annotations

import json

from aiohttp import web

from core.voice import AudioStream, StreamAborted
from http_files.services import SERVICES

__all__ = ["get_stream", "send_stream"]


def _not_found(message: str) -> web.HTTPNotFound:
    return web.HTTPNotFound(text=json.dumps({"error_code": "NOT_FOUND", "retryable": False,
                                             "message": message}),
                            content_type="application/json")


async def get_stream(request: web.Request) -> web.StreamResponse:
    streams = request.app[SERVICES].voice.streams
    instance, stream_id = request.match_info["instance"], request.match_info["stream_id"]
    if streams is None:
        raise _not_found("this engine does not stream voice")
    if instance != streams.instance:
        raise _not_found(f"stream {stream_id} is served by instance {instance!r}, not by "
                         f"{streams.instance!r}: route /streams/voice/{instance}/ to it")
    stream = streams.get(stream_id)
    if stream is None:
        raise _not_found(f"no stream {stream_id} here (it ended, or never was): the file "
                         "is at the completed event's url")
    return await send_stream(request, stream)


async def send_stream(request: web.Request, stream: AudioStream,
                      headers: dict[str, str] | None = None) -> web.StreamResponse:
    """``stream`` as a chunked response, from its start (see the module docstring)."""
    response = web.StreamResponse(headers={"Content-Type": stream.content_type,
                                           "Cache-Control": "no-store", **(headers or {})})
    response.enable_chunked_encoding()
    await response.prepare(request)
    try:
        async for block in stream.read():
            await response.write(block)
    except StreamAborted:
        if request.transport is not None:  # no final chunk: the listener sees it cut
            request.transport.close()
        return response
    await response.write_eof()
    return response
