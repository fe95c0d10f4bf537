"""GET /outputs/{filename}: a current output by exact name, with Range support.

Anything that is not a current output (unknown, expired, a path trick, a symlink) is a
plain 404: the store's exact-name lookup decides, the filesystem is never walked. With a
shared object store (``STORAGE_URL``), a file this instance does not hold is streamed from
the store, so that any instance answers for any output; only a name of an output's form
is ever looked up there.

Either way the body goes under the app's write deadline (:mod:`http_files.sending`): a
client that stops reading has its connection reset once ``app[WRITE_TIMEOUT]`` seconds
pass without it taking a block, and the file or store stream it held is closed.
"""

from __future__ import annotations

import contextlib
import logging

from aiohttp import web

from core.storage import SharedOutputs, StorageError
from http_files.sending import WRITE_TIMEOUT, ClientStalled, TimedFileResponse, send
from http_files.services import SERVICES

__all__ = ["get_output"]

logger = logging.getLogger(__name__)


async def get_output(request: web.Request) -> web.StreamResponse:
    store = request.app[SERVICES].store
    filename = request.match_info["filename"]
    path = store.resolve(filename)
    headers = {
        "Content-Type": store.content_type(filename),
        "Cache-Control": "private, max-age=3600",
        "X-Content-Type-Options": "nosniff",
    }
    if path is not None:
        return TimedFileResponse(path, request.app[WRITE_TIMEOUT], headers=headers)
    if store.shared is None or not store.is_output_name(filename):
        raise web.HTTPNotFound(text="no such output")
    return await _from_store(request, store.shared, filename, headers)


async def _from_store(request: web.Request, shared: SharedOutputs, filename: str,
                      headers: dict[str, str]) -> web.StreamResponse:
    """Streams ``filename`` from the store: whole, or the one range asked for (206). A
    store that fails before the answer began is a 503; after, the connection is dropped
    (a status can no longer be sent, and the client sees a short body, not a wrong one)."""
    try:
        wanted = request.http_range  # one range; a malformed header raises ValueError
    except ValueError:
        raise web.HTTPRequestRangeNotSatisfiable() from None
    start = end = None
    try:
        if wanted.start is not None or wanted.stop is not None:
            size = await shared.size(filename)
            if size is None:
                raise web.HTTPNotFound(text="no such output")
            if wanted.start is not None and wanted.start < 0:  # the last -start bytes
                start, end = max(0, size + wanted.start), size
            else:
                start, end = wanted.start or 0, min(size, wanted.stop or size)
            if start >= end:
                raise web.HTTPRequestRangeNotSatisfiable(
                    headers={"Content-Range": f"bytes */{size}"})
        read = await shared.open(filename, start=start, end=end)
    except StorageError as exc:
        logger.warning("output %s not read from the store: %s", filename, exc)
        raise web.HTTPServiceUnavailable(text="output storage unavailable; retry",
                                         headers={"Retry-After": "1"}) from None
    if read is None:
        raise web.HTTPNotFound(text="no such output")
    async with contextlib.aclosing(read.chunks) as chunks:  # closed if the client goes
        response = web.StreamResponse(status=206 if start is not None else 200, headers={
            **headers, "Accept-Ranges": "bytes",
            "Content-Length": str(read.end - read.start)})
        if start is not None:
            response.headers["Content-Range"] = \
                f"bytes {read.start}-{read.end - 1}/{read.size}"
        try:
            await send(request, response, chunks if request.method != "HEAD" else None,
                       request.app[WRITE_TIMEOUT])
        except StorageError as exc:
            logger.warning("output %s broke off while served: %s", filename, exc)
            raise ConnectionResetError("the store broke off") from exc
        except ClientStalled as exc:  # reset: the handler ends, nothing more to send
            logger.warning("output %s: %s", filename, exc)
    return response
