"""The Schema Registry that SCHEMA_REGISTRY_URL names, built the one way for every part that
reads or writes its wire format: the engine (``serve``, ``dev``) and the ``send`` command."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from core.settings import Settings
from schemas.registry import RegistryFraming

__all__ = ["registry_client", "registry_framing"]


def registry_client(settings: Settings) -> httpx.AsyncClient | None:
    """The HTTP client of the registry's calls (``SCHEMA_REGISTRY_TIMEOUT``), or ``None``
    without ``SCHEMA_REGISTRY_URL``; the caller closes it."""
    if settings.schema_registry_url is None:
        return None
    return httpx.AsyncClient(timeout=settings.schema_registry_timeout)


def registry_framing(settings: Settings, client: httpx.AsyncClient, *,
                     on_reachable: Callable[[bool], None] | None = None) -> RegistryFraming:
    """The registry of ``SCHEMA_REGISTRY_URL`` (with ``SCHEMA_REGISTRY_USER_INFO``), called
    through ``client`` (from :func:`registry_client`); ``on_reachable`` is told whether
    each call reached it. Raises ``ValueError`` when ``SCHEMA_REGISTRY_URL`` is not set."""
    if settings.schema_registry_url is None:
        raise ValueError("SCHEMA_REGISTRY_URL is not set: there is no registry to build")
    user_info = settings.schema_registry_user_info
    return RegistryFraming(settings.schema_registry_url, client,
                           user_info=None if user_info is None else user_info.get_secret_value(),
                           on_reachable=on_reachable)
