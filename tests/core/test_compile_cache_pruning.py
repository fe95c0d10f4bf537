"""The compile cache stays bounded: a save removes the older blobs of other names beyond the
newest KEEP, in the folder (real files) and in the shared store (a real S3 server on
127.0.0.1), and nothing else. A save that failed removes nothing; a blob that cannot be
removed is a warning; an instance whose blob was removed meanwhile just compiles.

The saves are real: this process compiles one tiny function first, so torch has artifacts
to hand over; blobs are aged as an earlier instance would have left them (file times; the
S3 server's own record of when an object was written)."""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from core.image.compile_cache import KEEP, CompileCache
from core.settings import load_settings
from core.storage import ObjectStore, build_object_store
from tests.support.s3_server import CREDENTIALS, S3Server, StoreLocation

pytestmark = [
    pytest.mark.slow,  # one compilation (about 5 s on the CPU), then fast
    pytest.mark.filterwarnings("ignore::DeprecationWarning:torch"),  # inductor's own imports
]

HOUR = 3600


@pytest.fixture(scope="module", autouse=True)
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Something compiled in this process: what ``save_cache_artifacts`` hands over."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor")))
        torch.compile(lambda x: x.t()[1:])(torch.ones(4, 4))
        assert torch.compiler.save_cache_artifacts() is not None
        yield


def blob(label: str) -> str:
    """A name as ``cache_name`` makes them."""
    return f"{hashlib.sha256(label.encode()).hexdigest()[:32]}.bin"


def leave(folder: Path, name: str, age: float) -> Path:
    """A blob another start wrote ``age`` seconds ago (negative: after this one's save)."""
    path = folder / name
    path.write_bytes(b"old kernels " + name.encode())
    then = time.time() - age
    os.utime(path, (then, then))
    return path


def warnings_in(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records
            if record.levelno >= logging.WARNING]


def test_a_save_keeps_the_newest_blobs_and_removes_older_ones_of_other_names(
        tmp_path: Path) -> None:
    folder = tmp_path / ".compile-cache"
    folder.mkdir()
    later = leave(folder, blob("another instance, after this save"), -60)
    kept = leave(folder, blob("last torch"), 1 * HOUR)
    removed = [leave(folder, blob(f"torch {age}h ago"), age * HOUR) for age in (2, 3, 4)]
    others = [leave(folder, name, 9 * HOUR)
              for name in ("notes.txt", "x.bin", ".partial-abc", "ABCDEF" * 5 + "00.bin")]

    cache = CompileCache(blob("this start"), folder)
    assert cache.save() > 0

    assert KEEP == 3  # this one and the two newest others
    assert sorted(folder.iterdir()) == sorted([folder / cache.name, later, kept, *others])
    assert not any(path.exists() for path in removed)


def test_a_save_that_failed_removes_nothing(tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / ".compile-cache"
    folder.mkdir()
    old = [leave(folder, blob(f"torch {age}h ago"), age * HOUR) for age in (1, 2, 3, 4)]
    cache = CompileCache(blob("this start"), folder)
    (folder / cache.name).mkdir()  # the blob cannot be written over it

    cache.save()

    assert all(path.exists() for path in old)
    assert any("not written" in line for line in warnings_in(caplog))


def test_a_blob_that_cannot_be_removed_is_a_warning_and_the_others_go(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / ".compile-cache"
    folder.mkdir()
    for age in (1, 2):
        leave(folder, blob(f"torch {age}h ago"), age * HOUR)
    stuck = folder / blob("a folder where a blob was")
    stuck.mkdir()
    os.utime(stuck, (time.time() - 3 * HOUR,) * 2)
    gone = leave(folder, blob("torch 4h ago"), 4 * HOUR)

    cache = CompileCache(blob("this start"), folder)
    assert cache.save() > 0

    assert stuck.is_dir() and not gone.exists() and (folder / cache.name).exists()
    assert [line for line in warnings_in(caplog)
            if "old blob" in line and stuck.name in line]


def objects_at(location: StoreLocation) -> ObjectStore:
    store = build_object_store(load_settings(storage_url=location.url,
                                             storage_endpoint_url=location.endpoint))
    assert store is not None
    return store


def age_in_store(server: S3Server, location: StoreLocation, key: str, age: float) -> None:
    """The S3 server's record of when ``key`` was written, moved ``age`` seconds back."""
    from moto.core.models import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    prefix = location.url.removeprefix(f"s3://{server.bucket}/")
    bucket = s3_backends[DEFAULT_ACCOUNT_ID]["aws"].buckets[server.bucket]
    stored = bucket.keys[f"{prefix}/{key}"]
    stored.last_modified -= datetime.timedelta(seconds=age)


def test_the_store_keeps_the_newest_blobs_and_removes_older_ones_of_other_names(
        tmp_path: Path, s3_store: StoreLocation, s3_server: S3Server) -> None:
    objects = objects_at(s3_store)
    ages = {blob("last torch"): 1, blob("torch 2h ago"): 2, blob("torch 3h ago"): 3,
            blob("torch 4h ago"): 4}
    for name, age in {**ages, "readme.txt": 9}.items():
        objects.put_bytes(f"compile-cache/{name}", b"old kernels",
                          content_type="application/octet-stream")
        age_in_store(s3_server, s3_store, f"compile-cache/{name}", age * HOUR)
    objects.put_bytes("outputs/" + blob("not a blob"), b"an output")
    age_in_store(s3_server, s3_store, "outputs/" + blob("not a blob"), 9 * HOUR)

    cache = CompileCache(blob("this start"), tmp_path / ".compile-cache", objects)
    assert cache.save() > 0

    assert sorted(objects.keys("compile-cache/")) == sorted(
        f"compile-cache/{name}" for name in (cache.name, blob("last torch"), blob("torch 2h ago"),
                                              "readme.txt"))
    assert objects.keys("outputs/") == ["outputs/" + blob("not a blob")]


def test_an_instance_whose_blob_was_removed_meanwhile_just_compiles(
        tmp_path: Path, s3_store: StoreLocation, s3_server: S3Server,
        caplog: pytest.LogCaptureFixture) -> None:
    """It listed or saw its blob, then another instance's save removed it before the read:
    from the shared folder or from the store, it is a quiet miss."""
    objects = objects_at(s3_store)
    shared_folder = tmp_path / "volume" / ".compile-cache"
    shared_folder.mkdir(parents=True)
    stale = blob("torch 5h ago")
    leave(shared_folder, stale, 5 * HOUR)
    for age in (1, 2, 3):
        leave(shared_folder, blob(f"torch {age}h ago"), age * HOUR)
    objects.put_bytes(f"compile-cache/{stale}", b"old kernels")
    age_in_store(s3_server, s3_store, f"compile-cache/{stale}", 5 * HOUR)
    for age in (1, 2):
        objects.put_bytes(f"compile-cache/{blob(f'torch {age}h ago')}", b"old kernels")
        age_in_store(s3_server, s3_store, f"compile-cache/{blob(f'torch {age}h ago')}",
                     age * HOUR)

    CompileCache(blob("this start"), shared_folder, objects).save()
    assert not (shared_folder / stale).exists()
    assert objects.get_bytes(f"compile-cache/{stale}") is None

    caplog.clear()
    assert CompileCache(stale, shared_folder).load().source is None
    assert CompileCache(stale, tmp_path / "own" / ".compile-cache", objects).load().source is None
    assert warnings_in(caplog) == []
    assert list((tmp_path / "own" / ".compile-cache").iterdir()) == []  # no partial left


def test_a_store_that_fails_the_save_removes_nothing_there_and_the_folder_is_pruned(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in CREDENTIALS.items():  # refused for want of a server, not of keys
        monkeypatch.setenv(name, value)
    failing = build_object_store(load_settings(
        storage_url="s3://engine-tests/x", storage_endpoint_url="http://127.0.0.1:9",
        storage_timeout=2))
    assert failing is not None
    folder = tmp_path / ".compile-cache"
    folder.mkdir()
    old = [leave(folder, blob(f"torch {age}h ago"), age * HOUR) for age in (1, 2, 3)]

    cache = CompileCache(blob("this start"), folder, failing)
    assert cache.save() > 0

    assert [path.exists() for path in old] == [True, True, False]
    assert any("not written to the shared store" in line and "127.0.0.1:9" in line
               for line in warnings_in(caplog))
    assert not any("not removed" in line for line in warnings_in(caplog))
