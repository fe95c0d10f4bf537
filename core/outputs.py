"""Generated files on disk: written atomically, found only by exact name, removed when old.

Promises of :class:`OutputStore`:

- A file becomes visible under its final name only when complete: writers write a hidden
  temporary name (``.tmp-{uuid}.{suffix}``) in the same directory, which is fsynced and
  renamed, then the directory fsynced (:func:`core.files.replace_durably`). A writer that
  fails leaves nothing behind.
- Names are ``{uuid4}.{suffix}`` (122 random bits), so a URL cannot be guessed.
- :meth:`OutputStore.resolve` answers only for a current output's exact name: lowercase
  uuid, a known suffix, a regular file (never a symlink), not expired. Anything else
  (``..``, separators, absolute paths, other case, temporary names) is ``None``; the name
  pattern admits no separator, so a resolved path is always directly inside the directory.
- With a ``cleanup_delay``, a file expires ``cleanup_delay`` seconds after its creation (its
  mtime, which is set from the store's clock) and is then neither served nor kept.
- With ``shared`` outputs (an object store, ``STORAGE_URL``), every file is also written
  once to the store before it is reported, with its expiry fixed then; the directory is
  this instance's cache of what it made, and a name found in neither is not an output.
  A file that cannot be written to the store is not an output: the write fails
  (``OSError``) and the local copy is removed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import stat
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from core.files import replace_durably
from core.storage import SharedOutputs

__all__ = ["CONTENT_TYPES", "OutputStore", "StoredFile", "content_type"]

logger = logging.getLogger(__name__)

CONTENT_TYPES: Mapping[str, str] = MappingProxyType({
    "png": "image/png",
    "jpg": "image/jpeg",
    "webp": "image/webp",
    "mp3": "audio/mpeg",
    "wav": "audio/wav",
    "ogg": "audio/ogg",
    "json": "application/json",
    "safetensors": "application/octet-stream",
})
"""The suffixes the store writes, with the HTTP content type each is served as."""
_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_SUFFIXES = "|".join(CONTENT_TYPES)
_OUTPUT_NAME = re.compile(rf"{_UUID}\.({_SUFFIXES})")
_TEMP_PREFIX = ".tmp-"
_TEMP_NAME = re.compile(rf"{re.escape(_TEMP_PREFIX)}{_UUID}\.({_SUFFIXES})")


def content_type(filename: str) -> str:
    """The HTTP content type of an output by its suffix (``application/octet-stream`` when
    the suffix is not one the store writes)."""
    return CONTENT_TYPES.get(filename.rpartition(".")[2], "application/octet-stream")


@dataclass(frozen=True)
class StoredFile:
    """A complete output: ``file_id`` is the uuid, ``url`` the public URL of the file."""

    file_id: str
    filename: str
    path: Path
    url: str
    created_at: float


class OutputStore:
    """Outputs in one directory (created if missing); see the module docstring for promises.

    ``cleanup_delay`` is the lifetime in seconds, ``None`` to keep files for ever (then
    nothing expires and :meth:`run_cleanup` returns at once). ``clock`` gives wall-clock
    seconds (injectable for tests).

    Raises ``ValueError`` for a ``cleanup_delay`` that is not positive.
    """

    def __init__(
        self,
        directory: Path,
        public_base_url: str = "",
        cleanup_delay: float | None = 3600.0,
        clock: Callable[[], float] = time.time,
        shared: SharedOutputs | None = None,
    ) -> None:
        if cleanup_delay is not None and not cleanup_delay > 0:
            raise ValueError(f"cleanup_delay must be > 0 seconds or None, got {cleanup_delay!r}")
        directory.mkdir(parents=True, exist_ok=True)
        self._directory = directory.resolve()
        self._base_url = public_base_url.rstrip("/")
        self._cleanup_delay = cleanup_delay
        self._clock = clock
        self._shared = shared

    @property
    def directory(self) -> Path:
        return self._directory

    @property
    def shared(self) -> SharedOutputs | None:
        """The outputs in the object store, when there is one."""
        return self._shared

    @property
    def cleanup_delay(self) -> float | None:
        return self._cleanup_delay

    content_type = staticmethod(content_type)

    def url_for(self, filename: str) -> str:
        """``{public_base_url}/outputs/{filename}``, or with ``OUTPUT_URLS=presigned`` a
        presigned store URL (signed anew at each call)."""
        if self._shared is not None and self._shared.presigned:
            return self._shared.url(filename)
        return f"{self._base_url}/outputs/{filename}"

    # --- writing ---

    def write(self, data: bytes, suffix: str) -> StoredFile:
        """Store ``data`` atomically under a new name ending in ``.{suffix}``.

        Raises ``ValueError`` for an unknown suffix and ``OSError`` when the disk fails.
        """

        def write_bytes(path: Path) -> None:
            path.write_bytes(data)

        return self.write_with(write_bytes, suffix)

    def write_with(self, writer: Callable[[Path], None], suffix: str) -> StoredFile:
        """Let ``writer`` write a temporary path, then publish it atomically.

        Whatever ``writer`` raises propagates after the temporary file is removed; nothing
        becomes visible. Raises ``ValueError`` for an unknown suffix.
        """
        temp = self._temp_path(suffix)
        try:
            writer(temp)
            return self._publish(temp, suffix)
        except BaseException:
            _unlink_quietly(temp)
            raise

    async def write_with_async(
        self, writer: Callable[[Path], Awaitable[None]], suffix: str
    ) -> StoredFile:
        """:meth:`write_with` for a coroutine writer (network or thread-pool work); the
        fsync and rename run in a worker thread. On failure or cancellation the temporary
        file is removed and the error propagates (a cancellation that arrives during the
        rename may leave a complete, unreported output, removed when it expires)."""
        temp = self._temp_path(suffix)
        try:
            await writer(temp)
            return await asyncio.to_thread(self._publish, temp, suffix)
        except BaseException:
            _unlink_quietly(temp)
            raise

    def _temp_path(self, suffix: str) -> Path:
        if suffix not in CONTENT_TYPES:
            raise ValueError(f"suffix must be one of {sorted(CONTENT_TYPES)}, got {suffix!r}")
        return self._directory / f"{_TEMP_PREFIX}{uuid.uuid4()}.{suffix}"

    def _publish(self, temp: Path, suffix: str) -> StoredFile:
        created = self._clock()
        os.utime(temp, (created, created))  # the creation time, used for expiry
        file_id = str(uuid.uuid4())
        filename = f"{file_id}.{suffix}"
        path = self._directory / filename
        replace_durably(temp, path)
        if self._shared is not None:
            try:
                self._shared.upload(path, filename, content_type=content_type(filename),
                                    expires_at=created + self._cleanup_delay
                                    if self._cleanup_delay is not None else None)
            except BaseException:
                _unlink_quietly(path)
                raise
        return StoredFile(file_id, filename, path, self.url_for(filename), created)

    # --- reading ---

    def resolve(self, filename: str) -> Path | None:
        """The path of the current output named exactly ``filename``, else ``None``."""
        return None if self._current(filename) is None else self._directory / filename

    def _current(self, filename: str) -> os.stat_result | None:
        """The file status of the current output named exactly ``filename`` here."""
        if _OUTPUT_NAME.fullmatch(filename) is None:
            return None
        try:
            info = os.lstat(self._directory / filename)
        except OSError:
            return None
        if not stat.S_ISREG(info.st_mode) or self._expired(info.st_mtime):
            return None
        return info

    def exists(self, filename: str) -> bool:
        """Whether ``filename`` names a current output: here (see :meth:`resolve`) or in the
        shared store (then a request to it: call from a worker thread). Raises ``OSError``
        when the store fails."""
        return self.life_left(filename) is not None

    def life_left(self, filename: str) -> float | None:
        """Seconds until the current output ``filename`` expires (``math.inf`` when
        nothing expires), here or else in the shared store (then a request to it: call
        from a worker thread); ``None`` when it is no current output. Raises ``OSError``
        when the store fails."""
        info = self._current(filename)
        if info is None:
            if self._shared is None or not self.is_output_name(filename):
                return None
            return self._shared.life_left(filename)
        if self._cleanup_delay is None:
            return math.inf
        left = info.st_mtime + self._cleanup_delay - self._clock()
        return left if left > 0 else None

    def is_output_name(self, filename: str) -> bool:
        """Whether ``filename`` has the form of an output's name (nothing else is ever
        looked up, here or in the store)."""
        return _OUTPUT_NAME.fullmatch(filename) is not None

    # --- cleanup ---

    def _expired(self, created: float) -> bool:
        return self._cleanup_delay is not None and created + self._cleanup_delay <= self._clock()

    def remove_expired(self) -> int:
        """Delete expired outputs and temporary files older than the delay (left by a
        crash); returns how many were deleted. Does nothing without a ``cleanup_delay``."""
        if self._cleanup_delay is None:
            return 0
        removed = 0
        with os.scandir(self._directory) as entries:
            for entry in entries:
                if not (_OUTPUT_NAME.fullmatch(entry.name) or _TEMP_NAME.fullmatch(entry.name)):
                    continue
                try:
                    info = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                expired = stat.S_ISREG(info.st_mode) and self._expired(info.st_mtime)
                if expired and _unlink_quietly(Path(entry.path)):
                    removed += 1
        return removed

    async def run_cleanup(self, interval: float, stop: asyncio.Event) -> None:
        """Remove expired files now and every ``interval`` seconds until ``stop`` is set.

        Returns at once without a ``cleanup_delay``. A failing pass is logged and the loop
        goes on (a full or flaky disk must not end cleanup for good).
        """
        if self._cleanup_delay is None:
            return
        while not stop.is_set():
            try:
                removed = await asyncio.to_thread(self.remove_expired)
            except OSError:
                logger.exception("output cleanup failed in %s", self._directory)
            else:
                if removed:
                    logger.info("removed %d expired outputs from %s", removed, self._directory)
            try:
                await asyncio.wait_for(stop.wait(), interval)
            except TimeoutError:
                pass


def _unlink_quietly(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True
