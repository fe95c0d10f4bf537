"""GET /outputs/{filename}: a current output by exact name, with Range support.

Anything that is not a current output (unknown, expired, a path trick, a symlink) is a
plain 404: the store's exact-name lookup decides, the filesystem is never walked.
"""

from __future__ import annotations

from aiohttp import web

from http_files.services import SERVICES

__all__ = ["get_output"]


async def get_output(request: web.Request) -> web.StreamResponse:
    store = request.app[SERVICES].store
    filename = request.match_info["filename"]
    path = store.resolve(filename)
    if path is None:
        raise web.HTTPNotFound(text="no such output")
    return web.FileResponse(
        path,
        headers={
            "Content-Type": store.content_type(filename),
            "Cache-Control": "private, max-age=3600",
            "X-Content-Type-Options": "nosniff",
        },
    )
