"""Outputs in the object store, for a fleet: ``outputs/{filename}``, written once by the
instance that made the file, then served by any instance (``GET /outputs/{file}``
streams it from the store) or fetched straight from the store by a presigned URL.

A file's expiry is fixed when it is written: the object carries ``expires-at`` (epoch
seconds: its writer's time plus its writer's ``CLEANUP_DELAY``), and no instance serves or
signs it past that, whatever its own settings say. Deleting expired objects is the store's
job (a lifecycle rule on ``outputs/``, see docs/deployment.md): no instance scans them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path

from core.storage.objects import ObjectRead, ObjectStore

__all__ = ["SharedOutputs"]

_PREFIX = "outputs/"
_EXPIRES = "expires-at"


class SharedOutputs:
    """``outputs/`` of ``objects``; ``presign_ttl`` (seconds) makes :meth:`url` a presigned
    store URL, ``None`` leaves URLs to the engine (``PUBLIC_BASE_URL/outputs/{file}``)."""

    def __init__(self, objects: ObjectStore, *, presign_ttl: float | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._objects = objects
        self._ttl = timedelta(seconds=presign_ttl) if presign_ttl is not None else None
        self._clock = clock

    @property
    def presigned(self) -> bool:
        return self._ttl is not None

    def upload(self, path: Path, filename: str, *, content_type: str,
               expires_at: float | None) -> None:
        """Writes the complete file at ``path`` as ``filename`` (sync: a worker thread).
        Raises :class:`~core.storage.StorageError`."""
        metadata = {_EXPIRES: str(int(expires_at))} if expires_at is not None else None
        self._objects.put_file(_PREFIX + filename, path, content_type=content_type,
                               metadata=metadata)

    def life_left(self, filename: str) -> float | None:
        """Seconds until ``filename`` expires (``math.inf`` when it carries no expiry of
        ours); ``None`` when it is missing or expired (sync: a worker thread). Raises
        :class:`~core.storage.StorageError`."""
        metadata = self._objects.metadata(_PREFIX + filename)
        if metadata is None:
            return None
        left = self._left(metadata)
        return left if left > 0 else None

    def url(self, filename: str) -> str:
        """The presigned URL of ``filename`` (needs ``presign_ttl``)."""
        assert self._ttl is not None, "presigned URLs need OUTPUT_URLS=presigned"
        return self._objects.sign_get(_PREFIX + filename, self._ttl)

    async def size(self, filename: str) -> int | None:
        """The size of ``filename`` in the store, ``None`` when missing (expiry unchecked:
        :meth:`open` checks it). Raises :class:`~core.storage.StorageError`."""
        return await self._objects.size(_PREFIX + filename)

    async def open(self, filename: str, *, start: int | None = None, end: int | None = None
                   ) -> ObjectRead | None:
        """A streamed read of ``filename``, all of it or ``start``..``end`` (exclusive);
        ``None`` when missing or expired. Raises :class:`~core.storage.StorageError`."""
        read = await self._objects.open(_PREFIX + filename, start=start, end=end)
        if read is None or self._expired(read.metadata):
            if read is not None:
                await read.chunks.aclose()
            return None
        return read

    def _expired(self, metadata: Mapping[str, str]) -> bool:
        return self._left(metadata) <= 0

    def _left(self, metadata: Mapping[str, str]) -> float:
        expires = metadata.get(_EXPIRES)
        try:
            return float(expires) - self._clock() if expires is not None else math.inf
        except ValueError:
            return math.inf  # written by something else: no expiry of ours
