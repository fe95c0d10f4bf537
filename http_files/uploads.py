"""Request bodies being received: a bounded number at once, each dropped when it stalls;
and where ``POST /train-lora`` bodies land, one private folder per upload.

At most MAX_CONCURRENT_UPLOADS uploads, and at most ``max_concurrent_json`` JSON bodies,
are received at once; one more is refused at once (:class:`UploadsFull`). A body that sends nothing for ``stall_seconds`` is answered 408
(:func:`stall_guard`). Each upload gets ``TEMP_DIR/uploads/upload-<random>/``, removed with
everything in it when the request ends, whatever the ending (answered, refused, failed, or
the client gone). At start-up the folder is emptied of what a crashed process left.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from core.settings import Settings
from http_files.errors import unreadable_body
from http_files.training_gate import TrainingGate

__all__ = ["UPLOADS", "UploadLimits", "Uploads", "UploadsFull", "stall_guard",
           "upload_limits"]

logger = logging.getLogger(__name__)

_ORPHAN_AGE = 3600.0  # seconds untouched before a start-up takes an upload for orphaned


@dataclass(frozen=True)
class UploadLimits:
    """``directory`` (TEMP_DIR/uploads) holds the uploads; a request body may have at most
    ``max_request_bytes`` (LORA_MAX_UPLOAD_BYTES); at most ``max_concurrent``
    (MAX_CONCURRENT_UPLOADS) are received at once, and at most ``max_concurrent_json``
    JSON bodies (each within ``JSON_BODY_LIMIT``: together at most 64 MiB by default);
    a body, upload or JSON, that sends nothing for ``stall_seconds`` is dropped. A new
    training is taken while fewer than ``max_trainings`` (MAX_IN_FLIGHT_LORA) are in
    progress on this instance (:mod:`http_files.training_gate`)."""

    directory: Path = Path("temp") / "uploads"
    max_request_bytes: int = 256 * 2**20
    max_concurrent: int = 2
    stall_seconds: float = 60.0
    max_concurrent_json: int = 64
    max_trainings: int = 2

    def __post_init__(self) -> None:
        if self.max_request_bytes < 1:
            raise ValueError(f"LORA_MAX_UPLOAD_BYTES must be >= 1, got {self.max_request_bytes}")
        if self.max_concurrent < 1:
            raise ValueError(f"MAX_CONCURRENT_UPLOADS must be >= 1, got {self.max_concurrent}")
        if self.stall_seconds <= 0:
            raise ValueError(f"stall_seconds must be > 0, got {self.stall_seconds}")
        if self.max_concurrent_json < 1:
            raise ValueError(f"max_concurrent_json must be >= 1, got "
                             f"{self.max_concurrent_json}")
        if self.max_trainings < 1:
            raise ValueError(f"MAX_IN_FLIGHT_LORA must be >= 1, got {self.max_trainings}")


def upload_limits(settings: Settings) -> UploadLimits:
    """The upload part of ``settings``."""
    return UploadLimits(settings.temp_dir / "uploads", settings.lora_max_upload_bytes,
                        settings.max_concurrent_uploads,
                        max_trainings=settings.max_in_flight_lora)


class UploadsFull(Exception):
    """As many bodies of one kind as allowed are being received: try again in
    ``retry_after`` seconds."""

    retry_after = 5


class _Slots:
    """At most ``limit`` bodies of one kind received at once; from the event loop only."""

    def __init__(self, limit: int, what: str, setting: str | None = None) -> None:
        self.limit = limit
        self.active = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self._what = what
        self._bound = f"{setting}={limit}" if setting else f"at most {limit} at once"

    @contextmanager
    def hold(self) -> Iterator[None]:
        if self.active >= self.limit:
            raise UploadsFull(f"{self.active} {self._what} are being received ({self._bound})")
        self.active += 1
        self.idle.clear()
        try:
            yield
        finally:
            self.active -= 1
            if not self.active:
                self.idle.set()


class Uploads:
    """The bodies of one app being received; used from the event loop only."""

    def __init__(self, limits: UploadLimits) -> None:
        self.limits = limits
        self._uploads = _Slots(limits.max_concurrent, "uploads", "MAX_CONCURRENT_UPLOADS")
        self._json = _Slots(limits.max_concurrent_json, "JSON request bodies")
        self.trainings = TrainingGate(limits.max_trainings)

    @property
    def active(self) -> int:
        """Uploads being received now."""
        return self._uploads.active

    @property
    def json_active(self) -> int:
        """JSON bodies being received now (with bytes still to come)."""
        return self._json.active

    async def wait_idle(self) -> None:
        """Returns once no body is being received (and no upload's folder is left)."""
        await self._uploads.idle.wait()
        await self._json.idle.wait()

    def receive_json(self) -> AbstractContextManager[None]:
        """A place for one JSON body while its bytes arrive. Raises :class:`UploadsFull`
        when ``max_concurrent_json`` are taken."""
        return self._json.hold()

    @asynccontextmanager
    async def receive(self) -> AsyncIterator[Path]:
        """A fresh, empty, private folder for one upload, removed with its content on exit.
        Raises :class:`UploadsFull` (nothing created) when ``max_concurrent`` are active,
        ``OSError`` when the folder cannot be made."""
        with self._uploads.hold():
            self.limits.directory.mkdir(parents=True, exist_ok=True)
            folder = Path(tempfile.mkdtemp(prefix="upload-", dir=self.limits.directory))
            try:
                yield folder
            finally:
                # on the loop, not in a thread: a cancelled request (the client gone) cannot
                # skip it, and unlinking at most MAX_LORA_IMAGES + 1 files takes milliseconds
                shutil.rmtree(folder, ignore_errors=True)

    def prepare(self) -> int:
        """Make the uploads folder and remove the upload folders a crashed process left
        (untouched for ``_ORPHAN_AGE`` seconds: another instance sharing TEMP_DIR may be
        receiving into the fresh ones); call it before serving. Returns how many were
        removed. Blocking.
        A folder that cannot be made is logged, not raised: the engine serves its other
        endpoints, and each upload then fails with a 500 (the cause in the log)."""
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


@asynccontextmanager
async def stall_guard(seconds: float) -> AsyncIterator[Callable[[], None]]:
    """Bounds each wait for a body's next bytes: call the yielded ``progress()`` before each
    read. When ``seconds`` pass from entering, or from the last ``progress()``, the block is
    cancelled and a 408 raised (the body stalled; :func:`unreadable_body`)."""
    loop = asyncio.get_running_loop()
    deadline = asyncio.timeout(loop.time() + seconds)
    try:
        async with deadline:
            yield lambda: deadline.reschedule(loop.time() + seconds)
    except TimeoutError:
        if not deadline.expired():  # another timeout, not this guard's
            raise
        raise unreadable_body(408, f"the body stalled: nothing arrived for {seconds:g} s",
                              "body_stalled") from None


UPLOADS: web.AppKey[Uploads] = web.AppKey("uploads", Uploads)
