"""Bodies that cannot be read are 4xx answers naming the problem, never a 5xx, on a real
server on 127.0.0.1; it serves the next request as before and keeps no file of them."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.core.test_training_images import photos
from tests.http.conftest import Serve, Served
from tests.http.forms import form
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


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"prompt": "hi", "width": ' + b"7" * 5000 + b"}",
         "body is not valid JSON: a number has too many digits"),
        (b'{"prompt": "\xff\xfe"}',
         "body is not valid JSON: it is not UTF-8 text (invalid start byte at byte 12)"),
        (b'{"prompt": "hi" "x"}',
         "body is not valid JSON: Expecting ',' delimiter (line 1, column 17)"),
    ],
    ids=["long-number", "not-utf8", "no-comma"],
)
async def test_invalid_json_is_described_in_the_body_s_terms(
    serve: Serve, body: bytes, message: str
) -> None:
    # what is wrong with the body and where, never the parser's advice to its programmer
    served = await serve()
    response = await served.client.post("/generate/image", data=body,
                                        headers={"Content-Type": "application/json"})
    detail = (await response.json())["detail"]
    assert response.status == 422, detail
    assert [d["msg"] for d in detail] == [message]


@pytest.mark.parametrize("path", JSON_PATHS)
async def test_a_stalled_json_body_is_408_and_gives_its_place_back(serve: Serve, path: str
                                                                   ) -> None:
    served = await serve(stall_seconds=0.5)
    reader, writer = await open_raw(served.client)
    writer.write(raw_head(path, {"Content-Type": "application/json",
                                 "Content-Length": str(2**20)}))
    writer.write(b"{" + b" " * (2**20 - 2))  # all but its last byte, then nothing
    await writer.drain()
    answer = await read_response(reader, timeout=20)
    writer.close()
    assert answer.status == 408, answer
    assert answer.json()["detail"][0]["msg"] == "the body stalled: nothing arrived for 0.5 s"
    assert served.uploads.json_active == 0
    await assert_still_serving(served)


async def test_a_slow_json_body_that_keeps_coming_is_read(serve: Serve) -> None:
    # the limit is on each wait for more, not on the whole body: 1.6 s in all is fine
    served = await serve(stall_seconds=1.0)
    body = json.dumps({"stability": 0.5, "style": 0.25}).encode()
    reader, writer = await open_raw(served.client)
    writer.write(raw_head("/generate/voice", {"Content-Type": "application/json",
                                              "Content-Length": str(len(body))}))
    pieces = [body[i:i + 4] for i in range(0, len(body), 4)]
    for index, piece in enumerate(pieces):
        writer.write(piece)
        await writer.drain()
        if index < 8:
            await asyncio.sleep(0.2)  # the slow sender, not a wait for the server
    answer = await read_response(reader, timeout=20)
    writer.close()
    assert answer.status == 422, answer  # read whole: only "text" is missing
    assert [d["loc"] for d in answer.json()["detail"]] == [["body", "text"]]


async def test_json_bodies_still_arriving_have_a_bounded_number_of_places(serve: Serve
                                                                          ) -> None:
    served = await serve()
    places = served.uploads.limits.max_concurrent_json
    start = raw_head("/generate/image", {"Content-Type": "application/json",
                                         "Content-Length": str(2**20)}) + b'{"prompt": "'
    held = []
    try:
        for _ in range(places):  # each sends the start of a 1 MiB body, then nothing
            _, writer = await open_raw(served.client)
            writer.write(start)
            held.append(writer)
        await until(lambda: served.uploads.json_active == places)

        reader, writer = await open_raw(served.client)
        writer.write(start)  # one more whose body is still coming: refused at once
        answer = await read_response(reader, timeout=20)
        writer.close()
        assert answer.status == 503 and answer.headers["retry-after"] == "5", answer
        refusal = answer.json()
        assert refusal["error_code"] == "UPSTREAM_UNAVAILABLE" and refusal["retryable"]
        assert f"at most {places} at once" in refusal["message"]

        # a body that has all arrived takes no place: stalled senders keep nobody out
        whole = await raw_post(served.client, "/generate/voice", {
            "Content-Type": "application/json", "Content-Length": "2"}, b"{}")
        assert whole.status == 422 and whole.json()["detail"][0]["loc"] == ["body", "text"]
    finally:
        for writer in held:
            writer.close()
    await served.uploads.wait_idle()  # each place freed as its sender went away
    metrics = await (await served.client.get("/metrics")).text()
    assert 'engine_http_rejected_total{kind="image"} 1.0' in metrics
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


async def test_an_upload_that_cannot_be_stored_is_500_without_our_paths(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    served = await serve()
    directory = served.uploads.limits.directory
    directory.rmdir()
    directory.write_bytes(b"")  # a file where the uploads folder should be
    with caplog.at_level(logging.ERROR):
        response = await served.client.post("/train-lora", data=form(photos(5)))
    body = await response.json()
    assert response.status == 500 and body["error_code"] == "INTERNAL", body
    assert str(served.temp) not in body["message"] and "Errno" not in body["message"]
    assert str(directory) in caplog.text  # the cause is in the log
