"""Bodies that cannot be read are 4xx answers naming the problem, never a 5xx, on a real
server on 127.0.0.1; it serves the next request as before and keeps no file of them."""

from __future__ import annotations

import gzip
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.http.conftest import Serve, Served
from tests.http.raw import head as raw_head
from tests.http.raw import open_raw, raw_post, read_response, until

JSON_PATHS = {"/generate/voice": "text", "/generate/image": "prompt"}
BOUNDARY = "x-b0undary-x"


def nested(depth: int, inner: str = "1") -> bytes:
    return ("[" * depth + inner + "]" * depth).encode()


def multipart(*parts: tuple[str, bytes], boundary: str = BOUNDARY, end: bool = True) -> bytes:
    chunks = []
    for name, data in parts:
        filename = '; filename="p.png"' if name == "images" else ""
        chunks.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"'
                      f"{filename}\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(chunks) + (f"--{boundary}--\r\n".encode() if end else b"")


async def assert_still_serving(served: Served) -> None:
    """The next request is answered as ever, and no upload is left on disk."""
    response = await served.client.post("/generate/voice", json={"stability": 0.5})
    assert response.status == 422, await response.text()
    assert ["body", "text"] in [d["loc"] for d in (await response.json())["detail"]]
    await served.uploads.wait_idle()
    assert served.files() == set()


async def assert_refused(response: aiohttp.ClientResponse, status: int, words: str) -> None:
    body = await response.json()
    assert response.status == status, body
    assert any(words in d["msg"] for d in body["detail"]), body


# ------------------------------------------------------------------ JSON endpoints
@pytest.mark.parametrize("path", JSON_PATHS)
@pytest.mark.parametrize(
    ("body", "words"),
    [
        (nested(50_000), "nested too deeply"),
        (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "nested too deeply"),
        (b'{"text": "hi", "prompt": "hi", "style": ' + nested(64) + b"}",
         "nested too deeply"),
        (b"{nope", "not valid JSON"),
        (b'{"text": "\xff\xfe"}', "not valid JSON"),
        (b'{"text": "hi", "seed": ' + b"7" * 5000 + b"}", "not valid JSON"),
    ],
    ids=["50000-arrays", "50000-objects", "65-levels", "invalid", "not-utf8", "long-number"],
)
async def test_unreadable_json_is_422_naming_the_problem(
    serve: Serve, path: str, body: bytes, words: str
) -> None:
    served = await serve()
    response = await served.client.post(path, data=body,
                                        headers={"Content-Type": "application/json"})
    await assert_refused(response, 422, words)
    await assert_still_serving(served)


@pytest.mark.parametrize(("path", "field"), list(JSON_PATHS.items()))
async def test_a_lone_surrogate_escape_is_422_naming_its_field(
    serve: Serve, path: str, field: str
) -> None:
    # valid JSON, but "\ud800" alone is no Unicode text: nothing may echo it back
    served = await serve()
    body = b'{"text": "hi", "prompt": "hi", "%s": "bad \\ud800 text"}' % field.encode()
    response = await served.client.post(path, data=body,
                                        headers={"Content-Type": "application/json"})
    detail = (await response.json())["detail"]
    assert response.status == 422, detail
    assert detail[0]["loc"] == ["body", field] and "lone surrogate" in detail[0]["msg"]
    await assert_still_serving(served)


async def test_64_levels_are_read_and_the_field_is_named(serve: Serve) -> None:
    served = await serve()
    body = b'{"text": "hi", "style": ' + nested(63) + b"}"  # the object is level 1
    response = await served.client.post("/generate/voice", data=body,
                                        headers={"Content-Type": "application/json"})
    assert response.status == 422
    assert [d["loc"] for d in (await response.json())["detail"]] == [["body", "style"]]


@pytest.mark.parametrize("path", JSON_PATHS)
@pytest.mark.parametrize("content_type", ["text/plain", "multipart/form-data; boundary=x",
                                          "application/x-www-form-urlencoded"])
async def test_a_body_that_is_not_json_is_415_naming_its_content_type(
    serve: Serve, path: str, content_type: str
) -> None:
    served = await serve()
    response = await served.client.post(path, data=b'{"text": "hi", "prompt": "hi"}',
                                        headers={"Content-Type": content_type})
    body = await response.json()
    assert response.status == 415, body
    assert body["detail"][0]["loc"] == ["header", "content-type"]
    assert content_type.split(";")[0] in body["detail"][0]["msg"]
    await assert_still_serving(served)


@pytest.mark.parametrize(("path", "field"), list(JSON_PATHS.items()))
async def test_json_without_a_content_type_is_read_as_json(
    serve: Serve, path: str, field: str
) -> None:
    served = await serve()
    answer = await raw_post(served.client, path, {"Content-Length": "2"}, b"{}")
    assert answer.status == 422
    assert ["body", field] in [d["loc"] for d in answer.json()["detail"]]


@pytest.mark.parametrize("path", JSON_PATHS)
async def test_a_json_body_over_1_mib_is_413_declared_or_streamed(serve: Serve, path: str
                                                                   ) -> None:
    served = await serve()
    big = b'{"text": "' + b"a" * (2 * 2**20) + b'"}'
    declared = await raw_post(served.client, path, {
        "Content-Type": "application/json", "Content-Length": str(len(big))}, big)
    assert declared.status == 413 and "too large" in declared.json()["detail"][0]["msg"]

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked, refused once past the limit
        for start in range(0, len(big), 2**16):
            yield big[start:start + 2**16]

    response = await served.client.post(path, data=chunks(),
                                        headers={"Content-Type": "application/json"})
    await assert_refused(response, 413, "too large")
    await assert_still_serving(served)


@pytest.mark.parametrize("path", JSON_PATHS)
async def test_a_body_broken_on_the_wire_is_400(serve: Serve, path: str) -> None:
    served = await serve()
    not_gzip = await raw_post(served.client, path, {
        "Content-Type": "application/json", "Content-Encoding": "gzip",
        "Content-Length": "12"}, b"not gzip at all"[:12])
    assert not_gzip.status == 400, not_gzip
    bad_chunks = await raw_post(served.client, path, {
        "Content-Type": "application/json", "Transfer-Encoding": "chunked"},
        b"zz\r\n{}\r\n0\r\n\r\n")
    assert bad_chunks.status == 400, bad_chunks
    zipped = gzip.compress(json.dumps({"stability": 0.5}).encode())  # still read fine
    answer = await raw_post(served.client, "/generate/voice", {
        "Content-Type": "application/json", "Content-Encoding": "gzip",
        "Content-Length": str(len(zipped))}, zipped)
    assert answer.status == 422 and answer.json()["detail"][0]["loc"] == ["body", "text"]
    await assert_still_serving(served)


# ------------------------------------------------------------------ /train-lora
@pytest.mark.parametrize(
    ("content_type", "body", "status", "words"),
    [
        ("application/json", b'{"character_id": "mia"}', 415, "multipart/form-data"),
        ("text/plain", b"character_id=mia", 415, "multipart/form-data"),
        ("multipart/form-data", multipart(("character_id", b"mia")), 400, "boundary"),
        (f"multipart/form-data; boundary={'b' * 71}", b"--" + b"b" * 71 + b"--\r\n", 400,
         "boundary"),
        (f"multipart/form-data; boundary={BOUNDARY}", b"\x00garbage\xff" * 1000, 400,
         "malformed"),
        (f"multipart/form-data; boundary={BOUNDARY}",
         multipart(("character_id", b"mia"), ("images", b"\x89PNG" + b"x" * 5000), end=False),
         400, "malformed"),
        (f"multipart/form-data; boundary={BOUNDARY}",
         f"--{BOUNDARY}\r\nX-Long: ".encode() + b"a" * 200_000 + b"\r\n\r\n", 400,
         "malformed"),
        (f"multipart/form-data; boundary={BOUNDARY}",
         f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"images\"\r\n"
         f"Content-Type: multipart/mixed; boundary=inner\r\n\r\n--inner--\r\n"
         f"\r\n--{BOUNDARY}--\r\n".encode(), 422, "nested multipart"),
    ],
    ids=["json", "text", "no-boundary", "long-boundary", "garbage", "cut-short",
         "long-header", "nested"],
)
async def test_a_malformed_training_upload_is_4xx_naming_the_problem(
    serve: Serve, content_type: str, body: bytes, status: int, words: str
) -> None:
    served = await serve()
    response = await served.client.post("/train-lora", data=body,
                                        headers={"Content-Type": content_type})
    await assert_refused(response, status, words)
    await assert_still_serving(served)


async def test_a_client_that_goes_away_mid_upload_leaves_nothing(serve: Serve) -> None:
    served = await serve()
    _, writer = await open_raw(served.client)
    start = multipart(("character_id", b"mia"), ("images", b"\x89PNG" + b"x" * 100_000),
                      end=False)
    writer.write(raw_head("/train-lora", {
        "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
        "Content-Length": str(len(start) + 10_000_000)}) + start)
    await writer.drain()
    await until(lambda: any(served.temp.glob("uploads/*/*")))  # its image file is open
    writer.close()  # gone mid-image
    await served.uploads.wait_idle()
    assert served.files() == set()
    await assert_still_serving(served)


async def test_a_stalled_upload_is_408_and_leaves_nothing(serve: Serve) -> None:
    served = await serve(stall_seconds=0.5)
    reader, writer = await open_raw(served.client)
    start = multipart(("character_id", b"mia"), ("images", b"\x89PNG" + b"x" * 1000),
                      end=False)
    writer.write(raw_head("/train-lora", {
        "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
        "Content-Length": str(len(start) + 1000)}) + start)
    await writer.drain()
    answer = await read_response(reader, timeout=30)
    writer.close()
    assert answer.status == 408 and "stalled" in answer.json()["detail"][0]["msg"]
    await assert_still_serving(served)
