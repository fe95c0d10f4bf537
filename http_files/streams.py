"""GET /streams/voice/{instance}/{stream_id}: a voice request's audio while it is made.

Chunked: the bytes so far at once, then the rest as they arrive; the response ends when
the audio is complete. A stream that fails or is cancelled ends the response without its
last chunk (the connection closes), so a player never takes half the audio for all of it.
A stream lives on the instance making it: another instance's name answers 404 saying
which instance has it (README, "Streaming voice").

Listeners are bounded, whatever clients do: a stream takes ``max_listeners`` at once
(:data:`core.voice.streams.MAX_LISTENERS`; one more is a 503 with ``Retry-After``), and a
listener that does not take a block within the stream's ``write_timeout`` has its
connection reset, without the final chunk, so its place and its buffers are freed
(:func:`http_files.sending.send`).
``HEAD`` answers the headers alone and takes no place (RFC 9110 9.3.2: no body, so the
connection stays usable for its next request).
"""

from __future__ import annotations

import contextlib
import json
import logging

from aiohttp import web

from core.voice import AudioStream, StreamAborted
from core.voice.streams import ListenersFull
from http_files.errors import error_response
from http_files.sending import ClientStalled, close, send
from http_files.services import SERVICES
from schemas.errors import UpstreamUnavailableError

__all__ = ["get_stream", "send_stream"]

logger = logging.getLogger(__name__)

_RETRY_AFTER_SECONDS = 2


def _not_found(message: str) -> web.HTTPNotFound:
    return web.HTTPNotFound(text=json.dumps({"error_code": "NOT_FOUND", "retryable": False,
                                             "message": message}),
                            content_type="application/json")


def _full(error: ListenersFull) -> web.Response:
    return error_response(UpstreamUnavailableError(
        f"{error}; retry after {_RETRY_AFTER_SECONDS} s, or fetch the completed event's url",
        retry_after=_RETRY_AFTER_SECONDS))


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
    response = _response(stream, {})
    if request.method == "HEAD":  # what a GET would answer, without joining the stream
        await response.prepare(request)
        await response.write_eof()
        return response
    try:
        return await _send(request, stream, response)
    except ConnectionResetError:  # the listener is gone: its place is left, no error
        return response


async def send_stream(request: web.Request, stream: AudioStream,
                      headers: dict[str, str] | None = None) -> web.StreamResponse:
    """``stream`` as a chunked response, from its start (see the module docstring).
    Answers a 503 (``Retry-After``) when the stream has its ``max_listeners`` already, and
    ``ConnectionResetError`` when the listener goes away or is dropped for taking no
    block within the stream's ``write_timeout`` (its connection reset): either way, the
    listener is gone."""
    return await _send(request, stream, _response(stream, headers or {}))


def _response(stream: AudioStream, headers: dict[str, str]) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": stream.content_type,
                                           "Cache-Control": "no-store", **headers})
    response.enable_chunked_encoding()
    return response


async def _send(request: web.Request, stream: AudioStream,
                response: web.StreamResponse) -> web.StreamResponse:
    try:
        place = stream.join()
    except ListenersFull as exc:
        return _full(exc)
    timeout = stream.write_timeout
    with place:  # left however the response ends: complete, cut, timed out, or gone
        try:
            async with contextlib.aclosing(stream.read()) as blocks:
                await send(request, response, blocks, timeout)
        except StreamAborted:  # no final chunk: the listener sees it cut
            close(request, timeout)
        except ClientStalled as exc:
            logger.warning("stream %s: a listener took nothing for %g s, having taken %d bytes; "
                           "its connection is reset", stream.id, timeout, exc.sent)
            raise ConnectionResetError(f"the listener of stream {stream.id} stopped "
                                       "reading") from None
    return response
