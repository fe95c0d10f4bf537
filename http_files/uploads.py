"""Where ``POST /train-lora`` bodies land: one private folder per upload, a bounded number
at once.

Each upload gets ``TEMP_DIR/uploads/upload-<random>/``, removed with everything in it when
the request ends, whatever the ending (answered, refused, failed, or the client gone).
At most MAX_CONCURRENT_UPLOADS are received at once; one more is refused at once, before
its body is read. At start-up the folder is emptied of what a crashed process left.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from core.settings import Settings

__all__ = ["UPLOADS", "UploadLimits", "Uploads", "UploadsFull", "upload_limits"]

logger = logging.getLogger(__name__)

_ORPHAN_AGE = 3600.0  # seconds untouched before a start-up takes an upload for orphaned


@dataclass(frozen=True)
class UploadLimits:
    """``directory`` (TEMP_DIR/uploads) holds the uploads; a request body may have at most
    ``max_request_bytes`` (LORA_MAX_UPLOAD_BYTES); at most ``max_concurrent``
    (MAX_CONCURRENT_UPLOADS) are received at once; a body that sends nothing for
    ``stall_seconds`` is dropped."""

    directory: Path = Path("temp") / "uploads"
    max_request_bytes: int = 256 * 2**20
    max_concurrent: int = 2
    stall_seconds: float = 60.0

    def __post_init__(self) -> None:
        if self.max_request_bytes < 1:
            raise ValueError(f"LORA_MAX_UPLOAD_BYTES must be >= 1, got {self.max_request_bytes}")
        if self.max_concurrent < 1:
            raise ValueError(f"MAX_CONCURRENT_UPLOADS must be >= 1, got {self.max_concurrent}")
        if self.stall_seconds <= 0:
            raise ValueError(f"stall_seconds must be > 0, got {self.stall_seconds}")


def upload_limits(settings: Settings) -> UploadLimits:
    """The upload part of ``settings``."""
    return UploadLimits(settings.temp_dir / "uploads", settings.lora_max_upload_bytes,
                        settings.max_concurrent_uploads)


class UploadsFull(Exception):
    """MAX_CONCURRENT_UPLOADS uploads are being received: try again shortly."""


class Uploads:
    """The uploads of one app; used from the event loop only."""

    def __init__(self, limits: UploadLimits) -> None:
        self.limits = limits
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def active(self) -> int:
        """Uploads being received now."""
        return self._active

    async def wait_idle(self) -> None:
        """Returns once no upload is in progress (and its folder is gone)."""
        await self._idle.wait()

    @asynccontextmanager
    async def receive(self) -> AsyncIterator[Path]:
        """A fresh, empty, private folder for one upload, removed with its content on exit.
        Raises :class:`UploadsFull` (nothing created) when ``max_concurrent`` are active,
        ``OSError`` when the folder cannot be made."""
        if self._active >= self.limits.max_concurrent:
            raise UploadsFull(f"{self._active} uploads are being received "
                              f"(MAX_CONCURRENT_UPLOADS={self.limits.max_concurrent})")
        self._active += 1
        self._idle.clear()
        try:
            self.limits.directory.mkdir(parents=True, exist_ok=True)
            folder = Path(tempfile.mkdtemp(prefix="upload-", dir=self.limits.directory))
            try:
                yield folder
            finally:
                # on the loop, not in a thread: a cancelled request (the client gone) cannot
                # skip it, and unlinking at most MAX_LORA_IMAGES + 1 files takes milliseconds
                shutil.rmtree(folder, ignore_errors=True)
        finally:
            self._active -= 1
            if not self._active:
                self._idle.set()

    def prepare(self) -> int:
        """Make the uploads folder and remove the upload folders a crashed process left
        (untouched for ``_ORPHAN_AGE`` seconds: another instance sharing TEMP_DIR may be
        receiving into the fresh ones); call it before serving. Returns how many were
        removed. Blocking.
        A folder that cannot be made is logged, not raised: the engine serves its other
        endpoints, and each upload then fails with a 500 saying why."""
        directory = self.limits.directory
        try:
            directory.mkdir(parents=True, exist_ok=True)
            now = time.time()
            found = [path for path in directory.iterdir() if path.name.startswith("upload-")
                     and now - _last_touched(path) > _ORPHAN_AGE]
        except OSError as exc:
            logger.warning("uploads folder %s is not usable: %s", directory, exc)
            return 0
        for path in found:
            shutil.rmtree(path, ignore_errors=True)
        if found:
            logger.info("removed %d unfinished uploads from %s", len(found), directory)
        return len(found)


def _last_touched(folder: Path) -> float:
    """The newest modification time of ``folder`` and the files in it."""
    try:
        times = [folder.stat().st_mtime]
        for entry in folder.iterdir():
            times.append(entry.stat().st_mtime)
    except OSError:  # going away meanwhile (its owner finished): not an orphan
        return time.time()
    return max(times)


UPLOADS: web.AppKey[Uploads] = web.AppKey("uploads", Uploads)
