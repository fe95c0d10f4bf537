"""Images from outside decoded as hostile input (core/untrusted_image.py), as starting
images and as training images: crafted data is a refusal naming the field, never an
internal error; decoding leaves the process's warning filters alone."""

from __future__ import annotations

import io
import threading
import warnings
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from core.image.init_image import InitImageLimits, decode_init_image
from core.training.images import check_image, check_image_file
from core.training.spec import TrainingLimits
from core.untrusted_image import decode
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
