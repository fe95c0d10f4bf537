"""Remembered results: one small JSON object per key in a directory, bounded, thread-safe.

The store behind "a replay costs nothing twice": a service keys a result by a fingerprint
of the request's content and keeps what it needs to answer (or to remake exactly the same
output once the file was cleaned up). Each entry is one file, written atomically (temporary
name, then rename), so a crash never leaves half an entry and several engine instances
sharing ``OUTPUT_DIR`` can share the entries. At most ``max_entries`` are kept: the least
recently used leave first (a hit refreshes an entry's time), checked every
``max_entries // 10`` writes (at most 1,000).

With a ``shared`` object store (``STORAGE_URL``), every entry is also written there under
``{namespace}/{key}.json``, and a key missing here is looked up there (and kept here), so
that a replay costs nothing whichever instance of the fleet takes it. Those lookups are
requests to the store: call :meth:`RememberedResults.get` from a worker thread then. The
store's entries are bounded by its lifecycle rules, not by ``max_entries``.

A remembered result is answered again (:func:`looked_up`) only while each of its files has
a useful life left (:func:`useful_life`): a URL answered a second before its file expires
is dead when the caller fetches it, so such a result is made again instead (the same
output under new names, with a whole life), images and voice alike.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from core.files import atomic_write
from core.outputs import OutputStore
from core.storage import ObjectStore

__all__ = ["MIN_USEFUL_LIFE_S", "USEFUL_LIFE_SHARE", "RememberedResults", "looked_up",
           "useful_life"]

T = TypeVar("T")

logger = logging.getLogger(__name__)

MIN_USEFUL_LIFE_S = 60.0
"""The least life (seconds) a remembered result's files must have left to be answered: time
for the caller to fetch them (a companion app, a slow consumer, a retry)."""
USEFUL_LIFE_SHARE = 0.1
"""The share of CLEANUP_DELAY they must have left, when that is more than
:data:`MIN_USEFUL_LIFE_S` (outputs that live an hour: 6 minutes)."""


def useful_life(cleanup_delay: float | None) -> float:
    """The life (seconds) a remembered result's files must have left to be answered again:
    ``max(MIN_USEFUL_LIFE_S, USEFUL_LIFE_SHARE * cleanup_delay)``, but at most half of
    ``cleanup_delay`` (a short CLEANUP_DELAY still lets replays answer from the first
    half of a file's life); 0 when files never expire (``None``)."""
    if cleanup_delay is None:
        return 0.0
    return min(cleanup_delay / 2, max(MIN_USEFUL_LIFE_S, USEFUL_LIFE_SHARE * cleanup_delay))


class RememberedResults:
    """JSON objects by key (a hex fingerprint) under ``directory`` (created if missing).

    Raises ``ValueError`` naming RESULT_CACHE_MAX_ENTRIES for ``max_entries`` < 1.
    """

    def __init__(self, directory: Path, *, max_entries: int = 100_000,
                 shared: ObjectStore | None = None, namespace: str = "results") -> None:
        if max_entries < 1:
            raise ValueError(f"RESULT_CACHE_MAX_ENTRIES must be >= 1, got {max_entries}")
        self._directory = directory
        self._shared = shared
        self._namespace = namespace
        self._max = max_entries
        self._prune_every = max(1, min(1000, max_entries // 10))
        self._puts = 0
        self._lock = threading.Lock()
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def directory(self) -> Path:
        return self._directory

    @property
    def shared(self) -> bool:
        """Whether lookups may ask the object store (then: from a worker thread)."""
        return self._shared is not None

    def get(self, key: str) -> dict[str, Any] | None:
        """The object remembered under ``key``, or ``None`` (none, or unreadable; a store
        that fails is logged and counts as none: the work is done again)."""
        path = self._directory / f"{key}.json"
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
            os.utime(path)  # recently used: the last to leave
        except FileNotFoundError:
            return self._get_shared(key)
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def _get_shared(self, key: str) -> dict[str, Any] | None:
        if self._shared is None:
            return None
        try:
            data = self._shared.get_bytes(f"{self._namespace}/{key}.json")
        except OSError as exc:
            logger.warning("remembered result %s not looked up in the store: %s", key, exc)
            return None
        try:
            value = json.loads(data) if data is not None else None
        except ValueError:
            return None
        if not isinstance(value, dict):
            return None
        try:  # kept here too: the next lookup is local
            self._put_local(key, value)
        except OSError:
            pass
        return value

    def put(self, key: str, value: dict[str, Any]) -> None:
        """Remember ``value`` (JSON-serializable) under ``key``, replacing any earlier one,
        here and in the shared store. Raises ``OSError`` when the disk or the store
        fails."""
        self._put_local(key, value)
        if self._shared is not None:
            self._shared.put_bytes(f"{self._namespace}/{key}.json",
                                   json.dumps(value).encode())

    def _put_local(self, key: str, value: dict[str, Any]) -> None:
        atomic_write(self._directory / f"{key}.json", json.dumps(value).encode("utf-8"))
        with self._lock:
            self._puts += 1
            due = self._puts % self._prune_every == 0
        if due:
            self.prune()

    def __len__(self) -> int:
        return len(self._entries())

    def prune(self) -> int:
        """Removes the least recently used entries beyond ``max_entries``; returns how
        many."""
        with self._lock:
            entries = self._entries()
            excess = len(entries) - self._max
            if excess <= 0:
                return 0
            entries.sort()
            for _, path in entries[:excess]:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
            return excess

    def _entries(self) -> list[tuple[float, str]]:
        entries = []
        with os.scandir(self._directory) as found:
            for entry in found:
                if entry.name.endswith(".json") and not entry.name.startswith("."):
                    try:
                        entries.append((entry.stat().st_mtime, entry.path))
                    except OSError:
                        continue
        return entries


async def looked_up(get: Callable[[str], T | None], outputs: OutputStore, key: str,
                    filenames: Callable[[Any], Iterable[str]], *, shared: bool
                    ) -> tuple[T | None, bool]:
    """The result remembered under ``key`` (by ``get``) and whether it may be answered:
    every one of its files (``filenames``) is still a current output with at least
    :func:`useful_life` left. With a ``shared`` store involved the lookup runs in a worker
    thread (requests to the store), else here (a few local file reads). A store that fails
    counts as files gone: the result is made again."""
    needed = useful_life(outputs.cleanup_delay)

    def usable(filename: str) -> bool:
        left = outputs.life_left(filename)
        return left is not None and left >= needed

    def look() -> tuple[T | None, bool]:
        remembered = get(key)
        if remembered is None:
            return None, False
        try:
            return remembered, all(map(usable, filenames(remembered)))
        except OSError as exc:
            logger.warning("outputs of remembered result %s not checked: %s", key, exc)
            return remembered, False

    return await asyncio.to_thread(look) if shared else look()
