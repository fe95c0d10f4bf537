"""The ``POST /train-lora`` multipart body, streamed part by part into an upload folder.

Each ``images`` part goes to its own file as it arrives (1 MiB at a time, written off the
event loop); nothing of an image is held in memory. Text parts (``character_id``,
``trigger_word``, ``request_id``, ``conversation_id``, ``steps``, ``learning_rate``,
``resolution``) are at most 4096 bytes; unknown ones are read and dropped, at most 32.

Refusals, each naming the problem in the FastAPI shape, the upload stopping at once:

- not ``multipart/form-data`` → 415;
- more than LORA_MAX_UPLOAD_BYTES → 413 (by ``Content-Length`` before reading, else as
  soon as the limit is passed);
- an image over LORA_MAX_IMAGE_BYTES, one image too many (MAX_LORA_IMAGES), a text field
  too long or not a number, a nested multipart → 422 naming the field;
- a malformed body (no boundary, a broken part, cut short, bad chunking) → 400;
- nothing received for ``stall_seconds`` → 408.
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from aiohttp import BadContentDispositionHeader, BodyPartReader, MultipartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from http_files.errors import unprocessable, unreadable_body
from http_files.uploads import UploadLimits, stall_guard
from schemas.errors import ErrorCode, InternalError

__all__ = ["BeforeImages", "TrainingForm", "read_training_form"]

BeforeImages = Callable[[dict[str, str | int | float]], Awaitable[None]]
"""Told the fields sent before the first image, before that image is stored."""

_TEXT_LIMIT = 4096
_MAX_OTHER_PARTS = 32
_TEXT_FIELDS = {"character_id", "trigger_word", "request_id", "conversation_id"}
_NUMBER_FIELDS: dict[str, type[int | float]] = {
    "steps": int, "learning_rate": float, "resolution": int}
_CHUNK = 64 * 1024
_FLUSH = 2**20


@dataclass
class TrainingForm:
    """The form's fields (as an event body, without images) and its image files in order."""

    fields: dict[str, str | int | float] = field(default_factory=dict)
    images: list[Path] = field(default_factory=list)


async def read_training_form(request: web.Request, folder: Path, limits: UploadLimits, *,
                             max_images: int, max_image_bytes: int,
                             before_images: BeforeImages | None = None) -> TrainingForm:
    """The form of ``request``, its images written into ``folder`` (which the caller
    removes); ``before_images(fields)`` is awaited once with the fields sent before the
    first image, before that image is stored (what it raises ends the upload). Raises the
    4xx of the module docstring, or :class:`InternalError` when a file cannot be
    written."""
    kind = request.content_type.lower()
    if kind != "multipart/form-data":
        raise unreadable_body(
            415, "the body must be multipart/form-data with character_id, trigger_word and "
            f"images, got {kind!r}", "content_type", loc=("header", "content-type"))
    declared = request.content_length
    if declared is not None and declared > limits.max_request_bytes:
        raise _too_large(limits, f"{declared}")
    try:
        async with stall_guard(limits.stall_seconds) as progress:
            return await _FormReader(request, folder, limits, max_images, max_image_bytes,
                                     progress, before_images).read()
    except (ValueError, RuntimeError, HttpProcessingError, web.RequestPayloadError) as exc:
        # aiohttp's multipart reader: no or a bad boundary, a part cut short, a broken header
        raise unreadable_body(400, f"the multipart body is malformed: {_reason(exc)}",
                              "multipart_malformed", code=ErrorCode.UNDECODABLE) from None
    except ConnectionError:  # the client went away mid-body (no one reads this)
        raise unreadable_body(400, "the body ended early", "body_incomplete",
                              code=ErrorCode.UNDECODABLE) from None


@dataclass(eq=False)
class _FormReader:
    request: web.Request
    folder: Path
    limits: UploadLimits
    max_images: int
    max_image_bytes: int
    progress: Callable[[], None]  # the stall guard's: called before each read
    before_images: BeforeImages | None = None
    form: TrainingForm = field(default_factory=TrainingForm)
    others: int = 0

    async def read(self) -> TrainingForm:
        reader = await self.request.multipart()
        while (part := await self._next(reader)) is not None:
            if not isinstance(part, BodyPartReader):
                raise unprocessable([{"field": "", "message": "nested multipart is not "
                                      "accepted"}])
            name = _name_of(part)
            if name == "images":
                if not self.form.images and self.before_images is not None:
                    await self.before_images(dict(self.form.fields))
                await self._image(part)
            else:
                await self._text(part, name)
        return self.form

    async def _image(self, part: BodyPartReader) -> None:
        index = len(self.form.images)
        if index >= self.max_images:
            raise unprocessable([{"field": "images", "message":
                                  f"at most {self.max_images} training images are allowed "
                                  f"(MAX_LORA_IMAGES), got more"}])
        name = f"images.{index}"
        path = self.folder / f"{index:02d}.upload"
        size = 0
        buffer = bytearray()
        try:
            with path.open("wb") as out:
                while chunk := await self._chunk(part):
                    size += len(chunk)
                    if size > self.max_image_bytes:
                        raise unprocessable([{"field": name, "message": f"{name}: more than "
                                              f"LORA_MAX_IMAGE_BYTES={self.max_image_bytes} "
                                              "bytes"}])
                    buffer += chunk
                    if len(buffer) >= _FLUSH:
                        await _write(out, buffer)
                await _write(out, buffer)
        except OSError as exc:
            if isinstance(exc, ConnectionError):
                raise
            raise InternalError(f"the upload could not be stored: {exc}") from exc
        self.form.images.append(path)

    async def _text(self, part: BodyPartReader, name: str) -> None:
        self.others += 1
        if self.others > _MAX_OTHER_PARTS:
            raise unprocessable([{"field": "", "message": f"more than {_MAX_OTHER_PARTS} "
                                  "form fields besides images"}])
        data = bytearray()
        while chunk := await self._chunk(part):
            data += chunk
            if len(data) > _TEXT_LIMIT:
                raise unprocessable([{"field": name, "message":
                                      f"{name or 'a field'}: more than {_TEXT_LIMIT} bytes"}])
        if name in _TEXT_FIELDS or name in _NUMBER_FIELDS:
            self.form.fields[name] = _text_value(name, bytes(data))

    async def _next(self, reader: MultipartReader) -> MultipartReader | BodyPartReader | None:
        self.progress()
        part = await reader.next()
        self._check_total()
        return part

    async def _chunk(self, part: BodyPartReader) -> bytes:
        self.progress()
        chunk = await part.read_chunk(_CHUNK)
        self._check_total()
        return chunk

    def _check_total(self) -> None:
        received = self.request.content.total_bytes  # after decompression, if any
        if received > self.limits.max_request_bytes:
            raise _too_large(self.limits, "more")


async def _write(out: IO[bytes], buffer: bytearray) -> None:
    if buffer:
        data = bytes(buffer)
        buffer.clear()
        await asyncio.to_thread(out.write, data)


def _name_of(part: BodyPartReader) -> str:
    with warnings.catch_warnings():  # a malformed Content-Disposition: a part without name
        warnings.simplefilter("ignore", BadContentDispositionHeader)
        return part.name or ""


def _text_value(name: str, raw: bytes) -> str | int | float:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise unprocessable([{"field": name, "message": f"{name} is not UTF-8 text"}]) from None
    convert = _NUMBER_FIELDS.get(name)
    if convert is None:
        return text
    try:
        return convert(text.strip())
    except ValueError:
        raise unprocessable([{"field": name, "message": f"{name} must be a number, got "
                              f"{text[:40]!r}"}]) from None


def _reason(exc: Exception) -> str:
    cause = exc.__cause__ if isinstance(exc, web.RequestPayloadError) else exc
    message = cause.message if isinstance(cause, HttpProcessingError) else None
    return str(message or cause or type(exc).__name__)[:200]


def _too_large(limits: UploadLimits, size: str) -> web.HTTPException:
    return unreadable_body(
        413, f"body is too large: a training upload may have at most "
        f"LORA_MAX_UPLOAD_BYTES={limits.max_request_bytes} bytes, this one has {size}",
        "body_too_large")
