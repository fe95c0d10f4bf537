"""The shared store on a real S3-protocol server (moto on 127.0.0.1): objects, outputs
that any instance finds, result caches that any instance answers from, and a store that
fails being a clear error that loses nothing."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest

from core.outputs import OutputStore
from core.remembered import RememberedResults
from core.settings import ConfigurationError, load_settings
from core.storage import ObjectStore, SharedOutputs, StorageError, build_object_store
from tests.support.s3_server import S3Server, StoreLocation


def objects_at(location: StoreLocation, **overrides: object) -> ObjectStore:
    store = build_object_store(load_settings(storage_url=location.url,
                                             storage_endpoint_url=location.endpoint,
                                             **overrides))
    assert store is not None
    return store


def test_no_storage_url_means_the_local_folders_alone() -> None:
    assert build_object_store(load_settings()) is None


def test_presigned_urls_need_a_store() -> None:
    with pytest.raises(ConfigurationError, match="OUTPUT_URLS='presigned'.*STORAGE_URL"):
        load_settings(output_urls="presigned")


def test_a_conditional_create_happens_once(s3_store: StoreLocation) -> None:
    objects = objects_at(s3_store)
    assert objects.create("registry/sarah_v1.json", b'{"first": true}') is True
    assert objects.create("registry/sarah_v1.json", b'{"second": true}') is False
    assert objects.get_bytes("registry/sarah_v1.json") == b'{"first": true}'
    assert objects.get_bytes("registry/missing.json") is None
    assert objects.keys("registry/") == ["registry/sarah_v1.json"]


async def test_reads_stream_whole_or_one_range(s3_store: StoreLocation, tmp_path: Path) -> None:
    data = os.urandom(700_000)
    (tmp_path / "f").write_bytes(data)
    objects = objects_at(s3_store)
    objects.put_file("outputs/f.png", tmp_path / "f", content_type="image/png",
                     metadata={"expires-at": "4102444800"})
    assert await objects.size("outputs/f.png") == len(data)
    whole = await objects.open("outputs/f.png")
    assert whole is not None and whole.metadata["expires-at"] == "4102444800"
    assert b"".join([chunk async for chunk in whole.chunks]) == data
    part = await objects.open("outputs/f.png", start=1000, end=5000)
    assert part is not None and (part.start, part.end, part.size) == (1000, 5000, len(data))
    assert b"".join([chunk async for chunk in part.chunks]) == data[1000:5000]
    assert await objects.open("outputs/none.png") is None


def test_an_unreachable_store_is_a_storage_error_and_an_os_error() -> None:
    objects = build_object_store(load_settings(
        storage_url="s3://engine-tests/x", storage_endpoint_url="http://127.0.0.1:9",
        storage_timeout=2))
    assert objects is not None
    began = time.monotonic()
    with pytest.raises(StorageError) as raised:
        objects.put_bytes("k.json", b"{}")
    assert isinstance(raised.value, OSError) and "k.json" in str(raised.value)
    assert time.monotonic() - began < 15


def test_an_output_written_by_one_instance_is_current_on_another(
        s3_store: StoreLocation, s3_server: S3Server, tmp_path: Path) -> None:
    shared = SharedOutputs(objects_at(s3_store))
    writer = OutputStore(tmp_path / "a", cleanup_delay=3600, shared=shared)
    reader = OutputStore(tmp_path / "b", cleanup_delay=3600, shared=shared)
    stored = writer.write(b"\x89PNG fake image", "png")
    assert reader.resolve(stored.filename) is None  # not on this instance's disk ...
    assert reader.exists(stored.filename)            # ... yet an output of the fleet
    prefix = s3_store.url.split("/", 3)[3]
    assert s3_server.object(f"{prefix}/outputs/{stored.filename}") == b"\x89PNG fake image"
    assert not reader.exists("00000000-0000-4000-8000-000000000000.png")
    assert not reader.exists("../outputs/" + stored.filename)


def test_expiry_is_the_writers_whatever_the_reader_says(s3_store: StoreLocation,
                                                        tmp_path: Path) -> None:
    now = [1_000_000.0]
    writer = OutputStore(tmp_path / "a", cleanup_delay=60,
                         shared=SharedOutputs(objects_at(s3_store), clock=lambda: now[0]),
                         clock=lambda: now[0])
    stored = writer.write(b"data", "mp3")
    later = [now[0] + 61]  # a reader that would keep files for a day still says expired
    reader = OutputStore(tmp_path / "b", cleanup_delay=86400,
                         shared=SharedOutputs(objects_at(s3_store), clock=lambda: later[0]))
    assert not reader.exists(stored.filename)
    later[0] = now[0] + 59
    assert reader.exists(stored.filename)


def test_presigned_urls_fetch_the_file_from_the_store(s3_store: StoreLocation,
                                                      tmp_path: Path) -> None:
    store = OutputStore(tmp_path / "a", shared=SharedOutputs(objects_at(s3_store),
                                                             presign_ttl=300))
    stored = store.write(b"RIFF fake wav", "wav")
    assert "X-Amz-Signature=" in stored.url and "X-Amz-Expires=300" in stored.url
    response = httpx.get(stored.url)
    assert response.status_code == 200 and response.content == b"RIFF fake wav"
    assert response.headers["content-type"] == "audio/wav"


def test_a_file_the_store_refuses_is_no_output_and_leaves_nothing(tmp_path: Path) -> None:
    objects = build_object_store(load_settings(
        storage_url="s3://engine-tests/x", storage_endpoint_url="http://127.0.0.1:9",
        storage_timeout=1))
    assert objects is not None
    store = OutputStore(tmp_path / "a", shared=SharedOutputs(objects))
    with pytest.raises(OSError):
        store.write(b"data", "png")
    assert not [p for p in (tmp_path / "a").iterdir()]


def test_a_result_remembered_by_one_instance_answers_on_another(s3_store: StoreLocation,
                                                                tmp_path: Path) -> None:
    objects = objects_at(s3_store)
    first = RememberedResults(tmp_path / "a", shared=objects, namespace="results/image")
    other = RememberedResults(tmp_path / "b", shared=objects, namespace="results/image")
    first.put("ab12", {"filename": "x.png", "seed": 7})
    assert other.get("ab12") == {"filename": "x.png", "seed": 7}
    assert (tmp_path / "b" / "ab12.json").exists()  # kept locally: the next is local
    assert other.get("cd34") is None
    voice = RememberedResults(tmp_path / "c", shared=objects, namespace="results/voice")
    assert voice.get("ab12") is None  # namespaces do not mix


def test_a_store_without_its_bucket_fails_the_probe_naming_it(s3_server: S3Server,
                                                              s3_store: StoreLocation) -> None:
    objects_at(s3_store).probe()  # usable: nothing left behind
    assert not objects_at(s3_store).keys("probes/")
    missing = StoreLocation(s3_store.endpoint, "s3://no-such-bucket/x")
    with pytest.raises(StorageError, match="no-such-bucket"):
        objects_at(missing, storage_timeout=5).probe()
