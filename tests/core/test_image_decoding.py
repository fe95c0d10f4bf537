"""Images from outside decoded as hostile input (core/untrusted_image.py), as starting
images and as training images: crafted data is a refusal naming the field, never an
internal error; decoding leaves the process's warning filters alone; every pixel format
(16-bit ones, transparency) becomes the 8-bit RGB it shows, the same for both uses."""

from __future__ import annotations

import io
import struct
import threading
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from core.image.init_image import InitImageLimits, decode_init_image
from core.training.images import check_image, check_image_file
from core.training.pixels import to_pixels
from core.training.spec import TrainingLimits
from core.untrusted_image import decode, to_rgb
from schemas.errors import InvalidRequestError


def exif_jpeg(yresolution_as_text: bool) -> bytes:
    """A 96x80 JPEG whose EXIF says "rotate 90°" (so decoding rewrites the EXIF) and has
    one more tag; with ``yresolution_as_text`` that tag is YResolution, a RATIONAL, stored
    as text: Pillow then fails writing it back with ``TypeError`` (found by fuzzing)."""
    exif = Image.Exif()
    exif[0x010F] = "cam"  # Make (text)
    exif[0x0112] = 6  # Orientation: rotate
    data = exif.tobytes()
    if yresolution_as_text:
        data = data.replace(b"\x01\x0f\x00\x02", b"\x01\x1b\x00\x02")  # Make → YResolution
    out = io.BytesIO()
    Image.new("RGB", (96, 80), (10, 200, 30)).save(out, format="JPEG", exif=data)
    return out.getvalue()


def test_a_valid_exif_orientation_is_applied() -> None:
    decoded = decode_init_image(exif_jpeg(False), "init_image", InitImageLimits())
    assert decoded.image.size == (80, 96)  # turned upright


@pytest.mark.parametrize("from_file", [False, True], ids=["bytes", "file"])
def test_crafted_exif_is_a_refusal_naming_the_field_not_an_internal_error(
    from_file: bool, tmp_path: Path
) -> None:
    data = exif_jpeg(True)
    with pytest.raises(InvalidRequestError) as refused:
        decode_init_image(data, "init_image_url", InitImageLimits())
    assert refused.value.field == "init_image_url"
    assert refused.value.message == "init_image_url: not a valid JPEG image"  # no Pillow text
    # training images follow the same rules (they are not turned: their EXIF is kept)
    limits = TrainingLimits()
    if from_file:
        (tmp_path / "upload").write_bytes(data)
        assert check_image_file(tmp_path / "upload", "images.0", limits).width == 96
    else:
        assert check_image(data, "images.0", limits).width == 96


def test_every_exception_of_finish_is_a_refusal() -> None:
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")

    def odd(_image: Image.Image) -> None:
        raise ZeroDivisionError("deep inside a plugin")

    with pytest.raises(InvalidRequestError) as refused:
        decode(lambda: io.BytesIO(png.getvalue()), "PNG", "init_image", max_pixels=100,
               finish=odd)
    assert refused.value.message == "init_image: not a valid PNG image"
    assert isinstance(refused.value.__cause__, ZeroDivisionError)  # kept for the logs


class Watching(io.BytesIO):
    """Image bytes that note, as Pillow reads them, whether the process's warning filters
    are still ``filters`` as they were (``catch_warnings`` swaps them process-wide, for
    every thread, while it is entered)."""

    def __init__(self, data: bytes, filters: list[Any], seen: list[bool]) -> None:
        super().__init__(data)
        self._filters, self._before, self._seen = filters, list(filters), seen

    def read(self, size: int | None = -1) -> bytes:
        self._seen.append(warnings.filters is self._filters
                          and warnings.filters == self._before)
        return super().read(size)


def test_decoding_leaves_the_warning_filters_of_other_threads_alone() -> None:
    png = io.BytesIO()
    Image.new("RGB", (64, 48)).save(png, format="PNG")
    filters = warnings.filters
    seen: list[bool] = []
    sizes: list[tuple[int, int]] = []

    def work() -> None:  # as the services do: in a worker thread
        sizes.append(decode(lambda: Watching(png.getvalue(), filters, seen), "PNG",
                            "init_image", max_pixels=10_000, finish=lambda image: image.size))

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(30)
    assert sizes == [(64, 48)] and seen and all(seen)


# --------------------------------------------------------------------------- pixel modes


def png_bytes(image: Image.Image, **params: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", **params)
    return out.getvalue()


def raw_png(samples: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG of ``samples`` (height, width, channels) written by hand: Pillow saves
    no 16-bit colour PNG. ``color_type`` 2 is RGB, 4 gray and alpha."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    height, width = samples.shape[:2]
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in samples)
    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


GRADIENT = np.linspace(0, 65520, 64 * 64).round().astype(np.uint16).reshape(64, 64)


def as_init_image(data: bytes) -> np.ndarray:
    return np.asarray(decode_init_image(data, "init_image", InitImageLimits()).image)


def as_training_pixels(data: bytes) -> np.ndarray:
    """The training tensor of one 64x64 image, back to 0-255 (HWC)."""
    tensor = to_pixels([data], 64)[0]
    return ((tensor.permute(1, 2, 0).numpy() + 1.0) * 127.5).round().astype(np.uint8)


def test_a_16_bit_grayscale_png_is_scaled_not_clipped_for_both_uses() -> None:
    data = png_bytes(Image.fromarray(GRADIENT))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    expected = np.repeat((GRADIENT >> 8).astype(np.uint8)[..., None], 3, axis=2)
    assert expected[0, 0, 0] == 0 and expected[-1, -1, 0] == 255  # the whole range
    np.testing.assert_array_equal(as_init_image(data), expected)
    np.testing.assert_array_equal(as_training_pixels(data), expected)
    assert check_image(data, "images.0", TrainingLimits()).format == "PNG"


def test_a_transparent_16_bit_gray_value_is_flattened_over_white() -> None:
    data = png_bytes(Image.fromarray(GRADIENT), transparency=int(GRADIENT[0, 1]))
    pixels = as_init_image(data)
    assert pixels[0, 1].tolist() == [255, 255, 255]  # the transparent value
    assert pixels[0, 0].tolist() == [0, 0, 0] and pixels[32, 0].tolist() == [128, 128, 128]


def test_16_bit_colour_pngs_keep_their_high_byte() -> None:
    rgb = np.zeros((4, 8, 3), np.uint16)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = np.linspace(0, 65535, 8), 30000, 65535
    expected = (rgb >> 8).astype(np.uint8)
    np.testing.assert_array_equal(as_init_image(raw_png(rgb, 2)), expected)
    gray_alpha = np.stack([np.full((4, 8), 65535 // 2), np.zeros((4, 8))], axis=2)
    gray_alpha[:, :4, 1] = 65535  # left half opaque mid-gray, right half transparent
    pixels = as_init_image(raw_png(gray_alpha, 4))
    assert pixels[0, 0].tolist() == [127] * 3 and pixels[0, 7].tolist() == [255] * 3


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I", "F"])
def test_every_high_bit_depth_mode_is_brought_to_8_bits(mode: str) -> None:
    values = np.array([[0, 256, 32768, 65535]])
    if mode == "I;16B":
        image = Image.frombytes(mode, (4, 1), values.astype(">u2").tobytes())
    else:
        image = Image.fromarray(values.astype(np.uint16)).convert(mode)
    assert image.mode == mode
    assert np.asarray(to_rgb(image))[0, :, 0].tolist() == [0, 1, 128, 255]


def test_i_and_f_values_outside_the_16_bit_scale_are_clipped_to_it() -> None:
    image = Image.fromarray(np.array([[-5.0, 70000.0]], np.float32), "F")
    assert np.asarray(to_rgb(image))[0, :, 0].tolist() == [0, 255]
    image = Image.fromarray(np.array([[-5, 70000]], np.int32), "I")
    assert np.asarray(to_rgb(image))[0, :, 0].tolist() == [0, 255]


def eight_bit_cases() -> dict[str, tuple[bytes, list[int], list[int]]]:
    """name → (image bytes, RGB of its first pixel, RGB of its last) after decoding."""
    rgba = Image.new("RGBA", (64, 64), (200, 0, 0, 255))
    rgba.putpixel((63, 63), (200, 0, 0, 0))
    half = Image.new("RGBA", (64, 64), (0, 0, 0, 128))
    palette = Image.new("P", (64, 64), 1)
    palette.putpalette([255, 0, 0, 0, 0, 255])
    palette.putpixel((63, 63), 0)
    la = Image.new("LA", (64, 64), (40, 255))
    la.putpixel((63, 63), (40, 0))
    cmyk = io.BytesIO()
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(cmyk, format="JPEG", quality=100)
    return {
        "RGBA": (png_bytes(rgba), [200, 0, 0], [255, 255, 255]),
        "RGBA half": (png_bytes(half), [127, 127, 127], [127, 127, 127]),
        "P transparent": (png_bytes(palette, transparency=0), [0, 0, 255], [255, 255, 255]),
        "LA": (png_bytes(la), [40, 40, 40], [255, 255, 255]),
        "L": (png_bytes(Image.new("L", (64, 64), 90)), [90] * 3, [90] * 3),
        "CMYK JPEG": (cmyk.getvalue(), [255, 0, 0], [255, 0, 0]),
    }


@pytest.mark.parametrize("case", list(eight_bit_cases()))
def test_8_bit_modes_and_transparency_decode_as_before(case: str) -> None:
    data, first, last = eight_bit_cases()[case]
    for pixels in (as_init_image(data), as_training_pixels(data)):
        assert np.abs(pixels[0, 0].astype(int) - first).max() <= 2, case
        assert np.abs(pixels[-1, -1].astype(int) - last).max() <= 2, case
