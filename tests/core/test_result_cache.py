"""The result cache stays bounded: the least recently used entries leave first."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from core.image.results import CachedResult, ResultCache


def entry(i: int) -> CachedResult:
    return CachedResult(f"id{i}", f"id{i}.png", "p", 64, 64, i)


def test_entries_beyond_the_bound_leave_least_recently_used_first(tmp_path: Path) -> None:
    cache = ResultCache(tmp_path, max_entries=10)
    for i in range(10):
        cache.put(f"k{i}", entry(i))
        os.utime(tmp_path / f"k{i}.json", (1000 + i, 1000 + i))  # put in this order
    assert cache.get("k0") == entry(0)  # used again: now the most recent
    for i in range(10, 15):  # five newer entries push out the five least recently used
        cache.put(f"k{i}", entry(i))
    assert len(list(tmp_path.glob("*.json"))) <= 10
    assert cache.get("k0") == entry(0)
    assert cache.get("k1") is None  # the least recently used left


def test_prune_keeps_the_newest(tmp_path: Path) -> None:
    cache = ResultCache(tmp_path, max_entries=3)
    now = time.time()
    for i in range(6):
        cache.put(f"k{i}", entry(i))
        os.utime(tmp_path / f"k{i}.json", (now - 100 + i, now - 100 + i))
    cache.prune()
    assert sorted(p.stem for p in tmp_path.glob("*.json")) == ["k3", "k4", "k5"]


def test_the_bound_is_checked() -> None:
    with pytest.raises(ValueError, match="RESULT_CACHE_MAX_ENTRIES"):
        ResultCache(Path("/nonexistent"), max_entries=0)
