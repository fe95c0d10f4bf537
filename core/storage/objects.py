"""One object store (S3 and S3-compatible stores) through obstore: what outlives an instance.

Why obstore: one small API, sync and async, over S3, GCS, Azure and local folders; streamed
puts (multipart above a threshold) and ranged, streamed gets; conditional creates
(``If-None-Match: *``) for registrations that must never collide, and conditional updates
(``If-Match``) for a training that one instance takes over; presigned URLs computed
locally; a Rust core with no Python dependency tree (aiobotocore would bring botocore).

Keys are relative to the store's prefix (``s3://bucket/prefix``). Every failure is a
:class:`StorageError`, an ``OSError``, so that code written for the disk treats a failing
store as a failing disk; its cause is kept. A missing object is ``None`` or ``False``,
never an error. The sync methods are for worker threads (the GPU worker writing files, a
thread hop); the event loop uses the async ones.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import uuid
from collections.abc import AsyncGenerator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import obstore
from obstore.exceptions import (
    AlreadyExistsError,
    BaseError,
    NotFoundError,
    NotModifiedError,
    PreconditionError,
)

from schemas.errors import UpstreamUnavailableError

__all__ = ["ObjectRead", "ObjectStore", "StorageError", "unavailable"]

logger = logging.getLogger(__name__)

_MISSING = (FileNotFoundError, NotFoundError)
# the store's own answers about an object: it is there and working
_ANSWERED = (NotFoundError, AlreadyExistsError, PreconditionError, NotModifiedError)


class StorageError(OSError):
    """The object store failed (unreachable, refused, timed out); ``__cause__`` says how."""


def unavailable(error: StorageError) -> UpstreamUnavailableError:
    """What a request is answered when the store fails: retryable (the store comes back),
    and saying nothing of the store's internals; the log has them."""
    logger.warning("shared store failed: %s", error)
    return UpstreamUnavailableError("the shared store is unavailable; retry later")


@dataclass(frozen=True)
class ObjectRead:
    """An open read of one object: ``size`` is the whole object's, ``start``..``end``
    (exclusive) the bytes ``chunks`` streams; ``metadata`` the attributes it was written
    with."""

    size: int
    start: int
    end: int
    metadata: Mapping[str, str]
    chunks: AsyncGenerator[bytes, None]


class ObjectStore:
    """Objects under ``where`` (``s3://bucket/prefix``, for messages) in ``store`` (an
    obstore store)."""

    def __init__(self, store: Any, *, where: str) -> None:
        self._store = store
        self._where = where
        # told after each call whether the store answered (an answer that the object is
        # missing or exists counts); from worker threads too: the callee marshals
        self.on_reachable: Callable[[bool], None] | None = None

    @property
    def where(self) -> str:
        return self._where

    def __repr__(self) -> str:
        return f"ObjectStore({self._where})"

    @contextlib.contextmanager
    def _failing(self, doing: str, key: str) -> Iterator[None]:
        """Turns the store's errors (and the disk's, for downloads) into one
        :class:`StorageError` saying what failed on which key; the cause is kept."""
        try:
            yield
        except (BaseError, OSError) as exc:
            if isinstance(exc, BaseError):  # not the local disk's: the store's
                self._seen(isinstance(exc, _ANSWERED))
            raise StorageError(f"cannot {doing} {key} in {self._where}: {_reason(exc)}") from exc
        self._seen(True)

    def _seen(self, reachable: bool) -> None:
        if self.on_reachable is not None:
            self.on_reachable(reachable)

    def probe(self) -> None:
        """Creates, reads back and deletes one small object: the store is usable (found,
        credentials accepted, writable) and honours conditional creates (a second create
        of the same key is refused: LoRA registrations rely on it). Raises
        :class:`StorageError` saying why not."""
        key = f"probes/{uuid.uuid4().hex}.json"
        if not self.create(key, b"{}"):
            raise StorageError(f"{self._where}: a fresh probe key existed already")
        try:
            if self.get_bytes(key) != b"{}":
                raise StorageError(f"{self._where} did not give back what was written")
            if self.create(key, b"{}"):
                raise StorageError(f"{self._where} ignores conditional creates "
                                   "(If-None-Match: *); registrations could collide")
        finally:
            self.delete(key)

    # --- writing (sync: worker threads) ---

    def put_file(self, key: str, path: Path, *, content_type: str,
                 metadata: Mapping[str, str] | None = None) -> None:
        """Uploads the file at ``path`` (streamed) to ``key``, replacing any object there."""
        self._put(key, path, content_type, metadata, "overwrite")

    def put_bytes(self, key: str, data: bytes, *, content_type: str = "application/json",
                  metadata: Mapping[str, str] | None = None) -> None:
        self._put(key, data, content_type, metadata, "overwrite")

    def create(self, key: str, data: bytes | Path, *, content_type: str = "application/json",
               metadata: Mapping[str, str] | None = None) -> bool:
        """Creates ``key`` only if no object is there (one atomic, conditional put);
        ``False`` when one was (someone else created it first)."""
        try:
            self._put(key, data, content_type, metadata, "create")
        except StorageError as exc:
            if isinstance(exc.__cause__, AlreadyExistsError | PreconditionError):
                return False
            raise
        return True

    def update(self, key: str, data: bytes, version: str, *,
               content_type: str = "application/json") -> bool:
        """Writes ``key`` only if its object is still at ``version`` (the ETag
        :meth:`get_versioned` gave; one atomic, conditional put, ``If-Match``); ``False``
        when it changed or went away meanwhile (someone else wrote it first)."""
        try:
            self._put(key, data, content_type, None, {"e_tag": version})
        except StorageError as exc:
            if isinstance(exc.__cause__, PreconditionError | AlreadyExistsError | NotFoundError):
                return False
            raise
        return True

    def _put(self, key: str, data: bytes | Path, content_type: str,
             metadata: Mapping[str, str] | None, mode: str | dict[str, str]) -> None:
        attributes = {"Content-Type": content_type, **(metadata or {})}
        with self._failing("write", key):
            obstore.put(self._store, key, data, attributes=attributes, mode=mode)  # type: ignore[arg-type]

    def delete(self, key: str) -> None:
        """Deletes ``key``; a missing object is not an error."""
        with self._failing("delete", key), contextlib.suppress(*_MISSING):
            obstore.delete(self._store, key)

    # --- reading (sync: worker threads) ---

    def get_bytes(self, key: str) -> bytes | None:
        """The whole object (for small ones: JSON entries), or ``None``."""
        with self._failing("read", key):
            try:
                return bytes(obstore.get(self._store, key).bytes())
            except _MISSING:
                return None

    def get_versioned(self, key: str) -> tuple[bytes, str | None] | None:
        """The whole object and its version (its ETag: what :meth:`update` is conditional
        on; ``None`` from a store that gives none), or ``None`` when missing."""
        with self._failing("read", key):
            try:
                result = obstore.get(self._store, key)
            except _MISSING:
                return None
            data = bytes(result.bytes())
        tag = result.meta.get("e_tag")
        return data, str(tag) if tag else None

    def download(self, key: str, path: Path) -> bool:
        """Streams the object into ``path`` (created or replaced); ``False`` when missing.
        A failed download leaves ``path`` partial: callers write a temporary name."""
        with self._failing("read", key):
            try:
                result = obstore.get(self._store, key)
            except _MISSING:
                return False
            with path.open("wb") as out:
                for chunk in result:
                    out.write(chunk)
        return True

    def metadata(self, key: str) -> Mapping[str, str] | None:
        """The attributes ``key`` was written with (one ranged read of its first byte: a
        plain HEAD does not carry them), or ``None`` when missing. For non-empty objects."""
        with self._failing("read", key):
            try:
                result = obstore.get(self._store, key, options={"range": (0, 1)})
            except _MISSING:
                return None
            result.bytes()
        return {str(k): str(v) for k, v in result.attributes.items()}

    def keys(self, prefix: str) -> list[str]:
        """Every key under ``prefix`` (a folder: ``outputs/``)."""
        with self._failing("list", prefix):
            return [str(meta["path"]) for batch in obstore.list(self._store, prefix)
                    for meta in batch]

    def last_modified(self, prefix: str) -> dict[str, datetime.datetime]:
        """Every key under ``prefix`` and when its object was last written (the store's
        clock, to the second on S3)."""
        with self._failing("list", prefix):
            return {str(meta["path"]): meta["last_modified"]
                    for batch in obstore.list(self._store, prefix) for meta in batch}

    def sign_get(self, key: str, ttl: datetime.timedelta) -> str:
        """A presigned GET URL for ``key``, valid for ``ttl`` (computed locally)."""
        with self._failing("sign", key):
            return str(obstore.sign(self._store, "GET", key, ttl))

    # --- reading (async: the event loop) ---

    async def size(self, key: str) -> int | None:
        """The size of ``key`` in bytes, or ``None`` when missing."""
        with self._failing("read", key):
            try:
                meta = await obstore.head_async(self._store, key)
            except _MISSING:
                return None
        return int(meta["size"])

    async def open(self, key: str, *, start: int | None = None, end: int | None = None
                   ) -> ObjectRead | None:
        """Opens ``key`` for a streamed read: all of it, or ``start``..``end`` (exclusive;
        ``end`` None: to the end). ``None`` when missing. Raises :class:`StorageError` (a
        range outside the object included)."""
        options: dict[str, Any] = {}
        if start is not None and end is not None:
            options["range"] = (start, end)
        elif start is not None:
            options["range"] = {"offset": start}
        with self._failing("read", key):
            try:
                result = await obstore.get_async(self._store, key, options=options)  # type: ignore[arg-type]
            except _MISSING:
                return None
        first, last = result.range
        where = self._where

        async def chunks() -> AsyncGenerator[bytes, None]:
            try:
                async for chunk in result.stream(min_chunk_size=256 * 1024):
                    yield bytes(chunk)
            except (BaseError, OSError) as exc:
                raise StorageError(f"reading {key} from {where} broke off: "
                                   f"{_reason(exc)}") from exc

        return ObjectRead(size=int(result.meta["size"]), start=int(first), end=int(last),
                          metadata={str(k): str(v) for k, v in result.attributes.items()},
                          chunks=chunks())


def _reason(exc: BaseException) -> str:
    """The first line of a store error (obstore appends pages of debug output)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__
