"""Training inputs checked before anything is written: image content (not names), size,
pixels (decompression bombs by their header), decoding, count, ids and trigger words; the
same checks from bytes in memory and from an uploaded file.

``photos()`` and ``bomb_png()`` are also used by the training tests elsewhere."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from core.training.images import (
    CheckedImage,
    check_count,
    check_image,
    check_image_file,
    sniff_format,
)
from core.training.spec import (
    TrainingLimits,
    check_character_id,
    check_hyperparameters,
    check_trigger_word,
    training_id_for,
)
from schemas.errors import InvalidRequestError

LIMITS = TrainingLimits(max_image_bytes=200_000, max_image_pixels=4_000_000)


def photos(count: int = 5, size: int = 96, formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP")
           ) -> list[bytes]:
    """``count`` distinct small pictures (a face-like disc on a gradient), cycling formats."""
    made = []
    for index in range(count):
        image = Image.new("RGB", (size, size + 8 * (index % 3)))
        draw = ImageDraw.Draw(image)
        for row in range(image.height):
            draw.line([(0, row), (size, row)], fill=(40 + row, 90 + 20 * index % 160, 160))
        x = 20 + 9 * index
        draw.ellipse([x, 24, x + 44, 70], fill=(230, 190, 160))
        draw.ellipse([x + 12, 38, x + 18, 44], fill=(20, 20, 20))
        draw.ellipse([x + 27, 38, x + 33, 44], fill=(20, 20, 20))
        buffer = io.BytesIO()
        image.save(buffer, formats[index % len(formats)])
        made.append(buffer.getvalue())
    return made


def bomb_png(width: int = 30_000, height: int = 30_000) -> bytes:
    """A small PNG whose header claims ``width`` × ``height`` grey pixels (all zero): a
    decompression bomb. Built by hand: Pillow would need the pixels in memory."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    row = b"\x00" + b"\x00" * width
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(64)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body)
            + chunk(b"IEND", b""))


def noise_png(side: int) -> bytes:
    """A PNG that does not compress: about 3 × side² bytes."""
    import numpy as np

    pixels = np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("index", range(3))
def test_png_jpeg_and_webp_are_accepted_by_their_content(index: int) -> None:
    data = photos(3)[index]
    checked = check_image(data, f"images.{index}", LIMITS)
    assert checked.format == ("PNG", "JPEG", "WEBP")[index] == sniff_format(data)
    assert (checked.width, checked.height) == Image.open(io.BytesIO(data)).size
    assert len(checked.sha256) == 64


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"just some text, named photo.png", "not a PNG, JPEG or WebP"),
        (b"", "empty"),
        (photos(1)[0][:200], "not a valid PNG"),  # truncated: the header reads, decoding fails
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "not a valid PNG"),
        (bomb_png(), "decompression bomb"),  # 900 M pixels claimed: refused from the header
        (bomb_png(2100, 2100), "LORA_MAX_IMAGE_PIXELS"),  # 4.4 M > 4 M: before decoding
        (noise_png(300), "LORA_MAX_IMAGE_BYTES"),
        (photos(1, size=40)[0], "too small"),
    ],
    ids=["text", "empty", "truncated", "garbage-after-magic", "bomb", "pixels", "bytes",
         "small"],
)
@pytest.mark.parametrize("from_file", [False, True], ids=["bytes", "file"])
def test_bad_images_are_refused_naming_the_image_and_the_reason(
    data: bytes, reason: str, from_file: bool, tmp_path: Path
) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        checked(data, "images.3", tmp_path if from_file else None)
    assert caught.value.field == "images.3"
    assert caught.value.message.startswith("images.3: ") and reason in caught.value.message


def checked(data: bytes, field: str, folder: Path | None) -> CheckedImage:
    """``data`` checked in memory, or (with ``folder``) from a file written there."""
    if folder is None:
        return check_image(data, field, LIMITS)
    path = folder / "upload"
    path.write_bytes(data)
    return check_image_file(path, field, LIMITS)


@pytest.mark.parametrize("index", range(3))
def test_an_uploaded_file_is_checked_like_its_bytes_and_not_kept_in_memory(
    index: int, tmp_path: Path
) -> None:
    data = photos(3)[index]
    from_bytes = check_image(data, "images.0", LIMITS)
    from_file = checked(data, "images.0", tmp_path)
    assert from_file.path == tmp_path / "upload" and from_file.data == b""
    assert (from_file.format, from_file.width, from_file.height, from_file.sha256) == (
        from_bytes.format, from_bytes.width, from_bytes.height, from_bytes.sha256)


def test_the_count_must_be_within_min_and_max_images() -> None:
    check_count(5, LIMITS)
    check_count(50, LIMITS)
    for count, word in ((4, "at least 5"), (51, "at most 50"), (0, "at least 5")):
        with pytest.raises(InvalidRequestError, match=word) as caught:
            check_count(count, LIMITS)
        assert caught.value.field == "images"


def test_training_ids_are_deterministic_per_request() -> None:
    first = training_id_for("sarah", "req-1")
    assert first == training_id_for("sarah", "req-1") != training_id_for("sarah", "req-2")
    assert first.startswith("sarah_") and len(first) == len("sarah_") + 8


@pytest.mark.parametrize("value", ["sarah", "Sarah-2", "a_b", "x" * 48])
def test_safe_character_ids_pass(value: str) -> None:
    assert check_character_id(value) == value


@pytest.mark.parametrize("value", ["", "../etc", "a/b", "-lead", "a.b", "x" * 49, "é"])
def test_unsafe_character_ids_are_refused(value: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        check_character_id(value)
    assert caught.value.field == "character_id"


@pytest.mark.parametrize("value", ["sarah", "Zoë", "ohwx woman", "j.doe", "sks-1"])
def test_usable_trigger_words_pass(value: str) -> None:
    assert check_trigger_word(value) == value


@pytest.mark.parametrize("value", ["", " sarah", "sarah ", "a\nb", "<lora>", "x" * 65, "a\u200bb"])
def test_unusable_trigger_words_are_refused(value: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        check_trigger_word(value)
    assert caught.value.field == "trigger_word"


def test_hyperparameters_default_from_settings_and_are_checked() -> None:
    limits = TrainingLimits(default_steps=300, default_learning_rate=2e-4,
                            default_resolution=512, max_resolution=1024)
    assert check_hyperparameters(None, None, None, limits) == (300, 2e-4, 512)
    assert check_hyperparameters(10, 1e-3, 64, limits) == (10, 1e-3, 64)
    cases: list[tuple[tuple[int | None, float | None, int | None], str]] = [
        ((0, None, None), "steps"), ((None, 2.0, None), "learning_rate"),
        ((None, None, 500), "resolution"), ((None, None, 2048), "resolution")]
    for (steps, rate, size), field in cases:
        with pytest.raises(InvalidRequestError) as caught:
            check_hyperparameters(steps, rate, size, limits)
        assert caught.value.field == field
