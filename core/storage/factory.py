"""The object store from settings: ``STORAGE_URL``, ``STORAGE_ENDPOINT_URL``, the usual
``AWS_*`` credentials and region (read from the environment by obstore)."""

from __future__ import annotations

from datetime import timedelta

from obstore.store import S3Store

from core.settings import Settings
from core.storage.objects import ObjectStore

__all__ = ["build_object_store"]


def build_object_store(settings: Settings) -> ObjectStore | None:
    """The store ``STORAGE_URL`` names, or ``None`` when it is unset (the local folders
    alone). Builds a client only: nothing is contacted here."""
    if settings.storage_url is None:
        return None
    bucket, _, prefix = settings.storage_url.removeprefix("s3://").partition("/")
    endpoint = settings.storage_endpoint_url
    timeout = timedelta(seconds=settings.storage_timeout)
    store = S3Store(
        bucket,
        prefix=prefix.strip("/") or None,
        endpoint=endpoint,
        # path-style (bucket in the path) for MinIO and other self-hosted endpoints
        virtual_hosted_style_request=endpoint is None,
        client_options={"timeout": timeout, "connect_timeout": min(timeout, timedelta(seconds=10)),
                        "allow_http": endpoint is not None and endpoint.startswith("http://")},
        retry_config={"max_retries": 3, "retry_timeout": timeout},
    )
    return ObjectStore(store, where=settings.storage_url)
