"""POST /train-lora streams its images into files, bounded per image, per request and in
concurrent uploads; every refusal leaves nothing on disk; memory stays flat however large
the body (RSS sampled while a 300 MB upload and a 60 MB JSON body are refused)."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import pytest

from core.lora import LoraRegistry
from tests.core.test_training_images import bomb_png, noise_png, photos
from tests.http.conftest import Serve, Served
from tests.http.forms import form
from tests.http.raw import head, open_raw, raw_post, read_response, until

WAIT = 60.0
BOUNDARY = "upl0ad-b0undary"
PAGE = os.sysconf("SC_PAGE_SIZE")


async def refused(served: Served, data: aiohttp.FormData, status: int, loc: list[str],
                  words: str) -> None:
    async with served.client.post("/train-lora", data=data) as response:
        body = await response.json()
        assert response.status == status, body
    assert any(d["loc"] == loc and words in d["msg"] for d in body["detail"]), body
    await served.uploads.wait_idle()
    assert served.files() == set()


def rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


@contextmanager
def peak_rss() -> Iterator[dict[str, int]]:
    """Samples this process's RSS every 5 ms: ``before`` and ``peak`` (bytes)."""
    figures = {"before": rss(), "peak": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            figures["peak"] = max(figures["peak"], rss())

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        yield figures
    finally:
        done.set()
        sampler.join()
        figures["peak"] = max(figures["peak"], rss())


async def streamed_multipart(parts: int, part_bytes: int) -> AsyncIterator[bytes]:
    """character_id, trigger_word, then ``parts`` image parts of ``part_bytes`` each,
    generated 64 KiB at a time (the same block: nothing accumulates here)."""
    block = b"\x89PNG\r\n\x1a\n" + bytes(2**16 - 8)
    yield (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"character_id\"\r\n\r\n"
           f"mia\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; "
           f"name=\"trigger_word\"\r\n\r\nzqx\r\n").encode()
    for index in range(parts):
        yield (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"images\"; "
               f"filename=\"{index}.png\"\r\nContent-Type: image/png\r\n\r\n").encode()
        for _ in range(part_bytes // len(block)):
            yield block
        yield b"\r\n"
    yield f"--{BOUNDARY}--\r\n".encode()


async def test_an_upload_trains_from_its_files_and_leaves_no_upload_behind(serve: Serve
                                                                           ) -> None:
    served = await serve()
    pictures = photos(6)
    async with served.client.post("/train-lora", data=form(pictures, request_id="up-1")
                                  ) as response:
        body = await response.json()
        assert response.status == 200, body
    assert body["status"] == "training_started"
    assert not any(served.temp.glob("uploads/*/*"))  # gone as the answer came
    done = await served.training.wait(body["training_id"])
    assert done is not None and done.state == "completed", done
    info = LoraRegistry(served.settings.lora_output_dir).get(done.lora_id or "")
    assert (info.training or {})["image_sha256"] == [
        hashlib.sha256(p).hexdigest() for p in pictures]  # the uploaded bytes, in order
    assert served.files() == set()


async def test_every_refused_upload_leaves_nothing_on_disk(serve: Serve) -> None:
    served = await serve(lora_max_upload_bytes=2**20)
    good = photos(5)
    await refused(served, form(good[:4]), 422, ["body", "images"], "at least 5")
    await refused(served, form([good[i % 5] for i in range(51)]), 422, ["body", "images"],
                  "at most 50")
    await refused(served, form([*good[:3], b"plain text, named .png", *good[3:]]), 422,
                  ["body", "images", "3"], "not a PNG, JPEG or WebP")
    await refused(served, form([bomb_png(), *good]), 422, ["body", "images", "0"],
                  "decompression bomb")
    await refused(served, form([*good, noise_png(300)]), 422, ["body", "images", "5"],
                  "LORA_MAX_IMAGE_BYTES")
    await refused(served, form(good, trigger_word=""), 422, ["body", "trigger_word"],
                  "blank")
    await refused(served, form([noise_png(250)] * 6 + good), 413, ["body"],
                  "LORA_MAX_UPLOAD_BYTES=1048576")  # each image fits, all do not
    declared = await raw_post(served.client, "/train-lora", {
        "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
        "Content-Length": str(2**20 + 1)}, b"")  # refused before any byte of it came
    assert declared.status == 413 and "LORA_MAX_UPLOAD_BYTES" in declared.body.decode()
    await served.uploads.wait_idle()
    assert served.files() == set()


async def test_one_upload_too_many_is_503_with_retry_after_before_its_body(serve: Serve
                                                                          ) -> None:
    served = await serve(max_concurrent_uploads=1)
    _, writer = await open_raw(served.client)
    start = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"images\"; "
             "filename=\"a.png\"\r\n\r\n").encode() + b"\x89PNG" + bytes(1000)
    writer.write(head("/train-lora", {
        "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
        "Content-Length": str(len(start) + 5000)}) + start)
    await writer.drain()
    await until(lambda: served.uploads.active == 1)

    second_reader, second_writer = await open_raw(served.client)
    second_writer.write(head("/train-lora", {  # headers only: the body never comes
        "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
        "Content-Length": "100000000"}))
    await second_writer.drain()
    answer = await read_response(second_reader)
    second_writer.close()
    assert answer.status == 503 and answer.headers["retry-after"] == "5"
    assert "MAX_CONCURRENT_UPLOADS=1" in answer.json()["message"]

    writer.close()  # the first one gives up: the next upload is received again
    await served.uploads.wait_idle()
    await refused(served, form(photos(4)), 422, ["body", "images"], "at least 5")


@pytest.mark.timeout(300)
async def test_a_300_mb_upload_is_413_with_memory_flat(serve: Serve) -> None:
    served = await serve(lora_max_image_bytes=20 * 2**20)  # LORA_MAX_UPLOAD_BYTES: 256 MiB
    await refused(served, form(photos(2)), 422, ["body", "images"], "at least 5")  # warm
    with peak_rss() as memory:
        async with served.client.post(
            "/train-lora", data=streamed_multipart(parts=20, part_bytes=15 * 10**6),
            headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
        ) as response:
            body = await response.json()
        await served.uploads.wait_idle()
    growth = memory["peak"] - memory["before"]
    print(f"\n300 MB upload: RSS {memory['before'] / 2**20:.0f} MiB before, peak "
          f"{memory['peak'] / 2**20:.0f} MiB, growth {growth / 2**20:.1f} MiB")
    assert response.status == 413, body
    assert "LORA_MAX_UPLOAD_BYTES=268435456" in body["detail"][0]["msg"]
    assert growth < 50 * 2**20
    assert served.files() == set()


async def test_a_60_mb_json_body_is_413_with_memory_flat(serve: Serve) -> None:
    served = await serve()
    block = b"a" * 2**16

    async def body() -> AsyncIterator[bytes]:
        yield b'{"text": "'
        for _ in range(60 * 10**6 // len(block)):
            yield block
        yield b'"}'

    with peak_rss() as memory:
        async with served.client.post("/generate/voice", data=body(),
                                      headers={"Content-Type": "application/json"}
                                      ) as response:
            answer = await response.json()
    growth = memory["peak"] - memory["before"]
    print(f"\n60 MB JSON: RSS {memory['before'] / 2**20:.0f} MiB before, peak "
          f"{memory['peak'] / 2**20:.0f} MiB, growth {growth / 2**20:.1f} MiB")
    assert response.status == 413 and "too large" in answer["detail"][0]["msg"]
    assert growth < 50 * 2**20


def test_start_up_removes_only_uploads_left_long_ago(tmp_path: Path) -> None:
    from http_files.uploads import UploadLimits, Uploads

    directory = tmp_path / "uploads"
    old, fresh = directory / "upload-old", directory / "upload-fresh"
    for folder in (old, fresh):
        folder.mkdir(parents=True)
        (folder / "images.0").write_bytes(b"x")
    long_ago = time.time() - 2 * 3600
    for path in (old, old / "images.0"):
        os.utime(path, (long_ago, long_ago))
    assert Uploads(UploadLimits(directory)).prepare() == 1
    assert not old.exists()
    assert fresh.exists()  # another instance sharing TEMP_DIR may be receiving into it
