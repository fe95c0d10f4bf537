"""The output store: atomic writes, unguessable names, exact-name lookup, expiry."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from core.outputs import OutputStore, content_type


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(tmp_path: Path, clock: FakeClock) -> OutputStore:
    return OutputStore(tmp_path / "outputs", "http://engine:8000/", 3600.0, clock)


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.005)

    await asyncio.wait_for(poll(), timeout)


def test_write_publishes_a_uuid_named_file_with_its_url(store: OutputStore) -> None:
    stored = store.write(b"ID3 audio", "mp3")

    assert uuid.UUID(stored.file_id).version == 4
    assert stored.filename == f"{stored.file_id}.mp3"
    assert stored.path == store.directory / stored.filename
    assert stored.path.read_bytes() == b"ID3 audio"
    assert stored.url == f"http://engine:8000/outputs/{stored.filename}"
    assert stored.created_at == 1_000_000.0
    assert store.resolve(stored.filename) == stored.path
    assert os.listdir(store.directory) == [stored.filename]


def test_names_are_unguessable(store: OutputStore) -> None:
    ids = {store.write(b"x", "png").file_id for _ in range(50)}
    assert len(ids) == 50
    assert all(uuid.UUID(i).version == 4 for i in ids)


def test_default_url_is_relative_as_in_the_original_api(tmp_path: Path) -> None:
    stored = OutputStore(tmp_path).write(b"x", "wav")
    assert stored.url == f"/outputs/{stored.filename}"


def test_nothing_is_visible_while_the_writer_writes(store: OutputStore) -> None:
    seen: list[str] = []

    def writer(path: Path) -> None:
        path.write_bytes(b"half")
        seen.extend(os.listdir(store.directory))

    stored = store.write_with(writer, "mp3")

    assert len(seen) == 1 and seen[0].startswith(".tmp-")
    assert store.resolve(seen[0]) is None
    assert os.listdir(store.directory) == [stored.filename]


def test_a_failing_writer_leaves_nothing_behind(store: OutputStore) -> None:
    def writer(path: Path) -> None:
        path.write_bytes(b"partial")
        raise RuntimeError("encoder crashed")

    with pytest.raises(RuntimeError, match="encoder crashed"):
        store.write_with(writer, "mp3")
    assert os.listdir(store.directory) == []


async def test_a_failing_or_cancelled_async_writer_leaves_nothing_behind(
    store: OutputStore,
) -> None:
    started = asyncio.Event()

    async def failing(path: Path) -> None:
        path.write_bytes(b"partial")
        raise ConnectionError("upstream went away")

    async def hanging(path: Path) -> None:
        path.write_bytes(b"partial")
        started.set()
        await asyncio.Event().wait()

    with pytest.raises(ConnectionError):
        await store.write_with_async(failing, "mp3")
    task = asyncio.create_task(store.write_with_async(hanging, "mp3"))
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert os.listdir(store.directory) == []


async def test_an_async_writer_publishes_atomically(store: OutputStore) -> None:
    async def writer(path: Path) -> None:
        path.write_bytes(b"mp3 bytes")

    stored = await store.write_with_async(writer, "mp3")
    assert store.resolve(stored.filename) == stored.path
    assert stored.path.read_bytes() == b"mp3 bytes"


def test_unknown_suffixes_and_delays_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="suffix"):
        OutputStore(tmp_path).write(b"x", "exe")
    with pytest.raises(ValueError, match="cleanup_delay"):
        OutputStore(tmp_path, cleanup_delay=0)


def test_resolve_answers_only_the_exact_name_of_a_current_output(
    store: OutputStore, tmp_path: Path
) -> None:
    stored = store.write(b"audio", "mp3")
    name = stored.filename
    secret = tmp_path / "secret.mp3"
    secret.write_bytes(b"not an output")
    alias = f"{uuid.uuid4()}.mp3"
    os.symlink(stored.path, store.directory / alias)
    temp = f".tmp-{uuid.uuid4()}.mp3"
    (store.directory / temp).write_bytes(b"in progress")
    folder = f"{uuid.uuid4()}.png"
    (store.directory / folder).mkdir()

    assert store.resolve(name) == stored.path
    assert store.exists(name)
    rejected = [
        "..", "../x", "../secret.mp3", f"../outputs/{name}", f"./{name}", str(stored.path),
        "/etc/passwd", name.upper(), name.replace(".mp3", ".MP3"), f"{name}\n", f" {name}",
        f"{name}\0", f"{uuid.uuid4()}.mp3", stored.file_id, alias, temp, folder, "",
        f"{uuid.uuid4()}.txt", str(uuid.uuid4()).replace("-", "") + ".mp3",
    ]  # fmt: skip
    for candidate in rejected:
        assert store.resolve(candidate) is None, candidate
        assert not store.exists(candidate)


def test_files_expire_after_the_cleanup_delay(store: OutputStore, clock: FakeClock) -> None:
    stored = store.write(b"audio", "mp3")

    clock.now += 3599.9
    assert store.resolve(stored.filename) == stored.path
    clock.now += 0.1
    assert store.resolve(stored.filename) is None


def test_without_cleanup_nothing_expires(tmp_path: Path, clock: FakeClock) -> None:
    store = OutputStore(tmp_path, cleanup_delay=None, clock=clock)
    stored = store.write(b"audio", "mp3")
    clock.now += 10 * 365 * 86400
    assert store.resolve(stored.filename) == stored.path
    assert store.remove_expired() == 0


def test_remove_expired_deletes_old_outputs_and_stale_temp_files_only(
    store: OutputStore, clock: FakeClock
) -> None:
    old = store.write(b"old", "png")
    clock.now += 1800
    young = store.write(b"young", "mp3")
    stale_temp = store.directory / f".tmp-{uuid.uuid4()}.mp3"
    stale_temp.write_bytes(b"left by a crash")
    os.utime(stale_temp, (clock.now - 3600, clock.now - 3600))
    fresh_temp = store.directory / f".tmp-{uuid.uuid4()}.mp3"
    fresh_temp.write_bytes(b"being written")
    os.utime(fresh_temp, (clock.now, clock.now))
    foreign = store.directory / "README.txt"
    foreign.write_text("not ours")
    os.utime(foreign, (0, 0))
    clock.now += 1800

    assert store.remove_expired() == 2
    assert sorted(os.listdir(store.directory)) == sorted(
        [young.filename, fresh_temp.name, foreign.name]
    )
    assert not old.path.exists()


async def test_run_cleanup_removes_expired_files_and_stops_promptly(
    store: OutputStore, clock: FakeClock
) -> None:
    stored = store.write(b"audio", "mp3")
    clock.now += 3600
    stop = asyncio.Event()

    task = asyncio.create_task(store.run_cleanup(interval=3600, stop=stop))
    await until(lambda: not stored.path.exists())
    stop.set()
    await asyncio.wait_for(task, 2)  # the long interval does not delay the stop


async def test_run_cleanup_returns_at_once_without_a_delay(tmp_path: Path) -> None:
    store = OutputStore(tmp_path, cleanup_delay=None)
    await asyncio.wait_for(store.run_cleanup(interval=3600, stop=asyncio.Event()), 2)


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        ("a.mp3", "audio/mpeg"),
        ("a.png", "image/png"),
        ("a.wav", "audio/wav"),
        ("a.safetensors", "application/octet-stream"),
        ("a.bin", "application/octet-stream"),
    ],
)
def test_content_types(filename: str, expected: str) -> None:
    assert content_type(filename) == expected
    assert OutputStore.content_type(filename) == expected
