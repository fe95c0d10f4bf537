"""Training images named by URL, fetched with the engine's shared ``httpx.AsyncClient``.

Only ``http``/``https``; at most LORA_MAX_IMAGE_BYTES (a larger ``Content-Length`` is
refused before reading, a body that grows past it is cut off); at most LORA_FETCH_TIMEOUT
seconds for the whole download. Errors name the URL's field (``image_urls.2``):

- not http(s), 4xx, too large → :class:`InvalidRequestError` (the request is wrong);
- 429, 5xx, connection errors, timeouts → :class:`UpstreamUnavailableError` (retryable).
"""

from __future__ import annotations

import asyncio

import httpx

from schemas.errors import InvalidRequestError, UpstreamUnavailableError

__all__ = ["fetch_image"]

_CHUNK = 64 * 1024


async def fetch_image(client: httpx.AsyncClient, url: str, *, field: str, max_bytes: int,
                      timeout: float) -> bytes:
    """The body at ``url``; raises as the module docstring says. Nothing is written."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise InvalidRequestError(f"{field}: not a valid URL: {exc}", field=field) from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise InvalidRequestError(f"{field}: only http and https URLs are fetched, got "
                                  f"{url[:200]!r}", field=field)
    try:
        async with asyncio.timeout(timeout):
            return await _download(client, parsed, field, max_bytes, timeout)
    except TimeoutError as exc:
        raise UpstreamUnavailableError(
            f"{field}: fetching the image took more than LORA_FETCH_TIMEOUT={timeout}s"
        ) from exc
    except httpx.HTTPError as exc:
        raise UpstreamUnavailableError(f"{field}: fetching the image failed: "
                                       f"{type(exc).__name__}: {exc}") from exc


async def _download(client: httpx.AsyncClient, url: httpx.URL, field: str, max_bytes: int,
                    timeout: float) -> bytes:
    async with client.stream("GET", url, timeout=timeout, follow_redirects=True) as response:
        status = response.status_code
        if status == 429 or status >= 500:
            raise UpstreamUnavailableError(f"{field}: the image server answered {status}")
        if status >= 400:
            raise InvalidRequestError(f"{field}: the image could not be fetched (HTTP {status})",
                                      field=field)
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            raise InvalidRequestError(
                f"{field}: {declared} bytes is more than LORA_MAX_IMAGE_BYTES={max_bytes}",
                field=field)
        body = bytearray()
        async for chunk in response.aiter_bytes(_CHUNK):
            body.extend(chunk)
            if len(body) > max_bytes:
                raise InvalidRequestError(
                    f"{field}: more than LORA_MAX_IMAGE_BYTES={max_bytes} bytes", field=field)
        return bytes(body)
