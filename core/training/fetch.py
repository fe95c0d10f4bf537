"""Training images named by URL, fetched through :class:`~core.net.SafeFetcher` with the
engine's shared ``httpx.AsyncClient``.

Only ``http``/``https``, only public addresses and the hosts of LORA_FETCH_ALLOWED_HOSTS,
redirects followed by hand (at most 3, each checked); at most LORA_MAX_IMAGE_BYTES (a
larger ``Content-Length`` is refused before reading, a body that grows past it is cut
off); at most LORA_FETCH_TIMEOUT seconds for the whole download. Errors name the URL's
field (``image_urls.2``) and a generic reason, never an address or a port:

- not http(s), an address not allowed, too many redirects, 4xx, too large →
  :class:`~schemas.errors.InvalidRequestError` (the request is wrong);
- 429, 5xx, connection errors, timeouts → :class:`~schemas.errors.UpstreamUnavailableError`
  (retryable).
"""

from __future__ import annotations

import httpx

from core.net import AllowedHosts, FetchLimits, SafeFetcher

__all__ = ["fetch_image"]


async def fetch_image(client: httpx.AsyncClient, url: str, *, field: str, max_bytes: int,
                      timeout: float, allowed_hosts: AllowedHosts | None = None) -> bytes:
    """The body at ``url``; raises as the module docstring says. Nothing is written."""
    limits = FetchLimits(max_bytes, timeout, max_bytes_setting="LORA_MAX_IMAGE_BYTES",
                         timeout_setting="LORA_FETCH_TIMEOUT")
    fetcher = SafeFetcher(client, limits, allowed_hosts=allowed_hosts)
    return await fetcher.fetch(url, field=field)
