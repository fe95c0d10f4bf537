"""Writing a generated image in the format asked for, with its generation parameters.

- ``png``: lossless; one ``iTXt`` chunk per parameter (:func:`~core.image.png.write_png`).
- ``jpeg`` (``.jpg``) and ``webp``: lossy at ``quality`` (1–100); the parameters go in an
  XMP packet (``<mme:prompt>…</mme:prompt>`` and so on, namespace :data:`XMP_NAMESPACE`),
  the metadata both formats carry and image tools (exiftool, Pillow's ``getxmp()``) read.

:func:`read_image_parameters` reads them back from either.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from xml.etree import ElementTree

from PIL import Image

from core.image.png import read_png_text, write_png

__all__ = ["SUFFIXES", "XMP_NAMESPACE", "read_image_parameters", "write_image"]

SUFFIXES = {"png": "png", "jpeg": "jpg", "webp": "webp"}
"""``output_format`` → the file's suffix (its content type follows the suffix)."""
XMP_NAMESPACE = "urn:multimodal-engine:generation:1"

_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
_X = "adobe:ns:meta/"
_RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
# characters XML 1.0 cannot carry (and lone surrogates, which UTF-8 cannot)
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def write_image(path: Path, image: Image.Image, parameters: Mapping[str, object], *,
                output_format: str = "png", quality: int = 90) -> None:
    """Saves ``image`` to ``path`` as ``output_format`` (``png``, ``jpeg``, ``webp``)
    carrying ``parameters`` (None values left out). Raises ``ValueError`` for another
    format, ``OSError`` when the file cannot be written."""
    if output_format == "png":
        write_png(path, image, parameters)
        return
    if output_format not in _PIL_FORMATS:
        raise ValueError(f"output_format must be one of {sorted(_PIL_FORMATS)}, "
                         f"got {output_format!r}")
    image.convert("RGB").save(path, format=_PIL_FORMATS[output_format], quality=quality,
                              xmp=_xmp(parameters))


def read_image_parameters(path: Path) -> dict[str, str]:
    """The generation parameters stored in the image file at ``path`` (any of the
    formats :func:`write_image` writes); empty when it has none."""
    with Image.open(path) as image:
        image.load()
        if image.format == "PNG":
            return read_png_text(path)
        packet = image.info.get("xmp")
    if not packet:
        return {}
    root = ElementTree.fromstring(packet)
    prefix = f"{{{XMP_NAMESPACE}}}"
    return {element.tag.removeprefix(prefix): element.text or ""
            for element in root.iter() if element.tag.startswith(prefix)}


def _xmp(parameters: Mapping[str, object]) -> bytes:
    ElementTree.register_namespace("x", _X)
    ElementTree.register_namespace("rdf", _RDF)
    ElementTree.register_namespace("mme", XMP_NAMESPACE)
    meta = ElementTree.Element(f"{{{_X}}}xmpmeta")
    rdf = ElementTree.SubElement(meta, f"{{{_RDF}}}RDF")
    description = ElementTree.SubElement(rdf, f"{{{_RDF}}}Description",
                                         {f"{{{_RDF}}}about": ""})
    for key, value in parameters.items():
        if value is not None:
            element = ElementTree.SubElement(description, f"{{{XMP_NAMESPACE}}}{key}")
            element.text = _NOT_XML.sub("\ufffd", str(value))
    return bytes(ElementTree.tostring(meta, encoding="utf-8"))
