"""Joining MP3 files into one, frame by frame, without re-encoding.

ElevenLabs speaks a long text in several requests; their MP3 answers become one file. MPEG
audio frames can be concatenated as they are (every encoder starts a file with an empty bit
reservoir), but the tags around them cannot: an ID3v2 tag before the frames, an ID3v1 tag
after them, and above all the Xing/Info header frame (with LAME's gapless delay and
padding) that tells readers the frame count, i.e. the duration. A header copied from the
first part would make the joined file as long as that part; a header left inside would be
decoded as a silent frame.

So :func:`join_mp3` drops every part's tags and header frame and writes one new header
frame in front of all audio frames: ``Xing`` (``Info`` when every frame has the same
bitrate) with the total frame and byte counts, plus a LAME extension with the first part's
encoder delay and the last part's padding when the parts had them. A reader then reports
``frames * samples_per_frame - delay - padding``, which exceeds the sum of the parts'
durations by the inner parts' delay and padding: under a frame plus the codec delay per
joint (at most 0.05 s at 44.1 kHz; the encoder's start-up and final-frame silence, heard
as a short pause between sentences). Frames cannot be trimmed without re-encoding, since a
frame may borrow bits from the one before it.

Memory: the parts' frames are found in place and copied once, straight into the result,
so a join holds the parts and the result, twice the audio (docs/voice.md, "The longest
text").
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from schemas.errors import InternalError

__all__ = ["join_mp3"]

# Layer III bitrates in kbit/s by index, for MPEG-1 and for MPEG-2/2.5 (0 = free format).
_BITRATES_V1 = (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)
_BITRATES_V2 = (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160)
# Sample rates by version bits (3: MPEG-1, 2: MPEG-2, 0: MPEG-2.5) and index.
_SAMPLE_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}
_LAME_EXTENSION = 36  # version string (9 bytes) + 27 bytes of fields, CRC last
_XING_FLAGS = 0x3  # frame count and byte count present


@dataclass(frozen=True)
class _Header:
    raw: bytes  # the 4 header bytes
    version: int  # 3 MPEG-1, 2 MPEG-2, 0 MPEG-2.5
    bitrate_index: int
    sample_rate: int
    mono: bool
    length: int  # bytes of the whole frame

    @property
    def mpeg1(self) -> bool:
        return self.version == 3

    @property
    def samples(self) -> int:
        return 1152 if self.mpeg1 else 576

    @property
    def side_info(self) -> int:
        if self.mpeg1:
            return 17 if self.mono else 32
        return 9 if self.mono else 17

    @property
    def stream(self) -> tuple[int, int, bool]:
        """What every frame of one stream shares."""
        return self.version, self.sample_rate, self.mono


def _frame_length(version: int, bitrate_index: int, sample_rate: int, padding: int) -> int:
    kbps = (_BITRATES_V1 if version == 3 else _BITRATES_V2)[bitrate_index]
    return (144_000 if version == 3 else 72_000) * kbps // sample_rate + padding


def _header_at(data: bytes, pos: int) -> _Header | None:
    """The Layer III frame header at ``pos``, or ``None`` when there is none."""
    if pos + 4 > len(data):
        return None
    b0, b1, b2, b3 = data[pos : pos + 4]
    version = (b1 >> 3) & 3
    bitrate_index = b2 >> 4
    rate_index = (b2 >> 2) & 3
    if (
        b0 != 0xFF
        or b1 & 0xE0 != 0xE0
        or version == 1  # reserved
        or (b1 >> 1) & 3 != 1  # not Layer III
        or bitrate_index in (0, 15)  # free format or invalid
        or rate_index == 3
    ):
        return None
    sample_rate = _SAMPLE_RATES[version][rate_index]
    return _Header(
        raw=bytes(data[pos : pos + 4]),
        version=version,
        bitrate_index=bitrate_index,
        sample_rate=sample_rate,
        mono=b3 >> 6 == 3,
        length=_frame_length(version, bitrate_index, sample_rate, (b2 >> 1) & 1),
    )


@dataclass
class _Part:
    first: _Header
    bitrates: set[int]
    lame_version: bytes | None = None  # 9 bytes, when the part had a LAME header
    lame_fields: bytes | None = None  # the 27 bytes after it
    delay: int = 0
    padding: int = 0
    # the audio frames, contiguous: a view of the part, no copy
    audio: memoryview = field(default_factory=lambda: memoryview(b""))
    frame_count: int = 0


def _skip_id3v2(data: bytes) -> int:
    if data[:3] != b"ID3" or len(data) < 10:
        return 0
    size = 0
    for byte in data[6:10]:  # syncsafe: 7 bits per byte
        size = (size << 7) | (byte & 0x7F)
    footer = 10 if data[5] & 0x10 else 0
    return 10 + size + footer


def _parse(data: bytes, index: int) -> _Part:
    pos = _skip_id3v2(data)
    end = len(data) - 128 if data[-128:-125] == b"TAG" else len(data)
    part: _Part | None = None
    start = pos  # of the first audio frame; the frames follow one another
    while True:
        header = _header_at(data, pos)
        if header is None or pos + header.length > end:
            break  # the end of the frames: a trailing tag, junk, or a cut-off last frame
        if part is None:
            part = _Part(first=header, bitrates=set())
            if _read_vbr_header(data[pos : pos + header.length], header, part):
                pos += header.length
                start = pos
                continue
        elif header.stream != part.first.stream:
            raise InternalError(f"MP3 part {index} changes its sample rate or channels")
        part.frame_count += 1
        part.bitrates.add(header.bitrate_index)
        pos += header.length
    if part is None or not part.frame_count:
        raise InternalError(f"MP3 part {index} holds no MPEG Layer III audio frame")
    part.audio = memoryview(data)[start:pos]
    return part


def _read_vbr_header(frame: bytes, header: _Header, part: _Part) -> bool:
    """Whether ``frame`` is a Xing/Info or VBRI header frame (no audio); records the LAME
    gapless fields in ``part`` when present."""
    if frame[36:40] == b"VBRI":
        return True
    offset = 4 + header.side_info
    if frame[offset : offset + 4] not in (b"Xing", b"Info"):
        return False
    (flags,) = struct.unpack_from(">I", frame, offset + 4)
    offset += 8 + 4 * bool(flags & 1) + 4 * bool(flags & 2) + 100 * bool(flags & 4)
    offset += 4 * bool(flags & 8)
    lame = frame[offset : offset + _LAME_EXTENSION]
    if len(lame) == _LAME_EXTENSION and lame[:4] in (b"LAME", b"L3.9", b"Lavf", b"Lavc"):
        part.lame_version, part.lame_fields = lame[:9], lame[9:]
        part.delay = (lame[21] << 4) | (lame[22] >> 4)
        part.padding = ((lame[22] & 0x0F) << 8) | lame[23]
    return True


def _crc16(data: bytes) -> int:
    """CRC-16/ARC (polynomial 0x8005, reflected), as LAME protects its tag with."""
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def _header_frame(parts: Sequence[_Part], frame_count: int, audio_bytes: int) -> bytes:
    first, last = parts[0], parts[-1]
    template = first.first
    lame = first.lame_version is not None and first.lame_fields is not None
    needed = 4 + template.side_info + 16 + (_LAME_EXTENSION if lame else 0)
    bitrates = set().union(*(part.bitrates for part in parts))
    index = min(bitrates)
    while _frame_length(template.version, index, template.sample_rate, 0) < needed:
        index += 1  # a low-bitrate frame can be too small for the header; 14 always fits
    length = _frame_length(template.version, index, template.sample_rate, 0)
    raw = template.raw
    header = bytes((raw[0], raw[1] | 0x01, (raw[2] & 0x0D) | (index << 4), raw[3]))

    frame = bytearray(length)
    frame[:4] = header  # no CRC (bit 1 set), no padding; side information stays zero
    offset = 4 + template.side_info
    tag = b"Info" if len(bitrates) == 1 else b"Xing"
    struct.pack_into(">4sIII", frame, offset, tag, _XING_FLAGS, frame_count, length + audio_bytes)
    if lame:
        assert first.lame_version is not None and first.lame_fields is not None
        offset += 16
        fields = bytearray(first.lame_fields)
        fields[2:10] = bytes(8)  # peak and gains described the first part only
        fields[12:15] = bytes(((first.delay >> 4), ((first.delay & 0x0F) << 4)
                               | (last.padding >> 8), last.padding & 0xFF))
        fields[16] = 0  # MP3 gain
        struct.pack_into(">IH", fields, 19, length + audio_bytes, 0)  # music length, CRC
        frame[offset : offset + 9] = first.lame_version
        frame[offset + 9 : offset + 36] = fields
        struct.pack_into(">H", frame, offset + 34, _crc16(bytes(frame[: offset + 34])))
    return bytes(frame)


def join_mp3(parts: Sequence[bytes]) -> bytes:
    """One MP3 stream playing ``parts`` one after the other (see the module docstring).

    A single part is returned unchanged. Raises :class:`InternalError` when a part holds
    no MPEG Layer III frame or the parts differ in sample rate or channels.
    """
    if not parts:
        raise InternalError("no MP3 parts to join")
    if len(parts) == 1:
        return bytes(parts[0])
    parsed = [_parse(bytes(data), index) for index, data in enumerate(parts)]
    stream = parsed[0].first.stream
    if any(part.first.stream != stream for part in parsed):
        raise InternalError("MP3 parts differ in sample rate or channels")
    # one copy of the audio, into the result: the parts and it are all a join holds
    frame_count = sum(part.frame_count for part in parsed)
    audio_bytes = sum(len(part.audio) for part in parsed)
    header = _header_frame(parsed, frame_count, audio_bytes)
    return b"".join([header, *(part.audio for part in parsed)])
