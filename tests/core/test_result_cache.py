"""The image result cache: entries round-trip, unreadable ones are not used, and the store
stays bounded (the least recently used entries leave first)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from core.image.results import CachedResult, ResultCache
from core.remembered import RememberedResults


def entry(i: int) -> CachedResult:
    return CachedResult(f"id{i}", f"id{i}.png", "p", 64, 64, i)


def cache_in(directory: Path, max_entries: int = 100) -> ResultCache:
    return ResultCache(RememberedResults(directory, max_entries=max_entries))


def test_an_entry_round_trips_with_every_image_of_its_request(tmp_path: Path) -> None:
    cache = cache_in(tmp_path)
    several = CachedResult("a", "a.webp", "p", 64, 80, 7, [
        {"image_id": "a", "filename": "a.webp", "seed": 7},
        {"image_id": "b", "filename": "b.webp", "seed": 8}])
    cache.put("k", several)
    assert cache.get("k") == several
    assert cache.get("missing") is None


def test_an_entry_of_another_shape_is_not_used(tmp_path: Path) -> None:
    cache = cache_in(tmp_path)
    (tmp_path / "old.json").write_text(json.dumps({"image_id": "x", "file": "x.png"}))
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "torn.json").write_text('{"image_id": ')
    assert [cache.get(key) for key in ("old", "list", "torn")] == [None, None, None]


def test_a_failed_write_raises_and_leaves_no_file(tmp_path: Path) -> None:
    directory = tmp_path / "results"
    cache = cache_in(directory)
    directory.rmdir()
    directory.write_text("a file where the directory was")  # every write now fails
    with pytest.raises(OSError):
        cache.put("k", entry(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def test_entries_beyond_the_bound_leave_least_recently_used_first(tmp_path: Path) -> None:
    cache = cache_in(tmp_path, max_entries=10)
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
    store = RememberedResults(tmp_path, max_entries=3)
    cache = ResultCache(store)
    now = time.time()
    for i in range(6):
        cache.put(f"k{i}", entry(i))
        os.utime(tmp_path / f"k{i}.json", (now - 100 + i, now - 100 + i))
    store.prune()
    assert sorted(p.stem for p in tmp_path.glob("*.json")) == ["k3", "k4", "k5"]
