"""Remembered results: one small JSON object per key in a directory, bounded, thread-safe.

The store behind "a replay costs nothing twice": a service keys a result by a fingerprint
of the request's content and keeps what it needs to answer (or to remake exactly the same
output once the file was cleaned up). Each entry is one file, written atomically (temporary
name, then rename), so a crash never leaves half an entry and several engine instances
sharing ``OUTPUT_DIR`` can share the entries. At most ``max_entries`` are kept: the least
recently used leave first (a hit refreshes an entry's time), checked every
``max_entries // 10`` writes (at most 1,000).
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

__all__ = ["RememberedResults"]


class RememberedResults:
    """JSON objects by key (a hex fingerprint) under ``directory`` (created if missing).

    Raises ``ValueError`` naming RESULT_CACHE_MAX_ENTRIES for ``max_entries`` < 1.
    """

    def __init__(self, directory: Path, *, max_entries: int = 100_000) -> None:
        if max_entries < 1:
            raise ValueError(f"RESULT_CACHE_MAX_ENTRIES must be >= 1, got {max_entries}")
        self._directory = directory
        self._max = max_entries
        self._prune_every = max(1, min(1000, max_entries // 10))
        self._puts = 0
        self._lock = threading.Lock()
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def directory(self) -> Path:
        return self._directory

    def get(self, key: str) -> dict[str, Any] | None:
        """The object remembered under ``key``, or ``None`` (none, or unreadable)."""
        path = self._directory / f"{key}.json"
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
            os.utime(path)  # recently used: the last to leave
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def put(self, key: str, value: dict[str, Any]) -> None:
        """Remember ``value`` (JSON-serializable) under ``key``, replacing any earlier one.
        Raises ``OSError`` when the disk fails."""
        fd, temp = tempfile.mkstemp(dir=self._directory, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(value, handle)
            os.replace(temp, self._directory / f"{key}.json")
        except BaseException:
            try:
                os.unlink(temp)
            except FileNotFoundError:
                pass
            raise
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
