"""Joining MP3 parts into one stream, frame by frame, as they arrive, without re-encoding.

ElevenLabs speaks a long text in several requests, and the local voice a text sentence by
sentence; their MP3 answers become one stream, and the file is that stream. MPEG audio
frames can be concatenated as they are (every encoder starts a file with an empty bit
reservoir), but the tags around them cannot: an ID3v2 tag before the frames, an ID3v1 tag
after them, and above all the Xing/Info header frame (with LAME's gapless delay and
padding) that tells readers the frame count, i.e. the duration. A header copied from the
first part would make the joined file as long as that part; a header left inside would be
decoded as a silent frame.

So :class:`Mp3Joiner` drops every part's tags and header frame and puts one header frame of
its own in front of all audio frames: ``Xing`` (``Info`` when every frame has the same
bitrate) with the total frame and byte counts, plus a LAME extension with the first part's
encoder delay and the last part's padding when the parts had them. A reader then reports
``frames * samples_per_frame - delay - padding``, which exceeds the sum of the parts'
durations by the inner parts' delay and padding: under a frame plus the codec delay per
joint (at most 0.05 s at 44.1 kHz; the encoder's start-up and final-frame silence, heard
as a short pause between sentences). Frames cannot be trimmed without re-encoding, since a
frame may borrow bits from the one before it.

The counts are known only at the end, so the header frame goes out first with none (a
``Xing`` frame with no fields, the LAME extension with the first part's delay and no
padding: what a player of a live stream needs) and :meth:`Mp3Joiner.finish` gives the
same frame with the counts, of the same length, to write over it. Frames go out as soon
as each is complete (a frame is 26 ms of audio at 44.1 kHz).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from schemas.errors import InternalError

__all__ = ["Mp3Joiner", "join_mp3"]

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


def _header_at(data: bytes | bytearray, pos: int) -> _Header | None:
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
    frame_count: int = 0
    audio_bytes: int = 0


def _skip_id3v2(data: bytes | bytearray) -> int:
    if data[:3] != b"ID3" or len(data) < 10:
        return 0
    size = 0
    for byte in data[6:10]:  # syncsafe: 7 bits per byte
        size = (size << 7) | (byte & 0x7F)
    footer = 10 if data[5] & 0x10 else 0
    return 10 + size + footer


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


def _header_frame(parts: Sequence[_Part], frame_count: int | None, audio_bytes: int) -> bytes:
    """The joined stream's header frame; ``frame_count`` ``None``: the placeholder that
    goes out first (no counts, no padding), of the same length as the final one."""
    first, last = parts[0], parts[-1]
    template = first.first
    lame = first.lame_version is not None and first.lame_fields is not None
    needed = 4 + template.side_info + 16 + (_LAME_EXTENSION if lame else 0)
    index = template.bitrate_index
    while _frame_length(template.version, index, template.sample_rate, 0) < needed:
        index += 1  # a low-bitrate frame can be too small for the header; 14 always fits
    length = _frame_length(template.version, index, template.sample_rate, 0)
    raw = template.raw
    header = bytes((raw[0], raw[1] | 0x01, (raw[2] & 0x0D) | (index << 4), raw[3]))

    frame = bytearray(length)
    frame[:4] = header  # no CRC (bit 1 set), no padding; side information stays zero
    offset = 4 + template.side_info
    if frame_count is None:
        struct.pack_into(">4sI", frame, offset, b"Xing", 0)
        offset += 8
        padding, music = 0, 0
    else:
        bitrates = set().union(*(part.bitrates for part in parts))
        tag = b"Info" if len(bitrates) == 1 else b"Xing"
        struct.pack_into(">4sIII", frame, offset, tag, _XING_FLAGS, frame_count,
                         length + audio_bytes)
        offset += 16
        padding, music = last.padding, length + audio_bytes
    if lame:
        assert first.lame_version is not None and first.lame_fields is not None
        fields = bytearray(first.lame_fields)
        fields[2:10] = bytes(8)  # peak and gains described the first part only
        fields[12:15] = bytes(((first.delay >> 4), ((first.delay & 0x0F) << 4)
                               | (padding >> 8), padding & 0xFF))
        fields[16] = 0  # MP3 gain
        struct.pack_into(">IH", fields, 19, music, 0)  # music length, CRC
        frame[offset : offset + 9] = first.lame_version
        frame[offset + 9 : offset + 36] = fields
        struct.pack_into(">H", frame, offset + 34, _crc16(bytes(frame[: offset + 34])))
    return bytes(frame)


class Mp3Joiner:
    """MP3 parts, given in order as their bytes arrive, as one stream (see the module
    docstring): :meth:`feed` the current part's bytes and send what it returns,
    :meth:`end_part` at each part's end, then :meth:`finish` for the header frame to write
    over the stream's first bytes.

    Raises :class:`InternalError` when a part holds no MPEG Layer III frame or the parts
    differ in sample rate or channels (from :meth:`feed` or :meth:`end_part`).
    """

    def __init__(self) -> None:
        self._parts: list[_Part] = []
        self._frames_before: list[int] = []  # per part: audio frames of the parts before it
        self._placeholder: bytes | None = None
        self._restart()

    def _restart(self) -> None:
        self._pending = bytearray()
        self._skip: int | None = None  # ID3v2 bytes still to skip; None: not known yet
        self._part: _Part | None = None
        self._tail = False  # past the last frame: a trailing tag or junk, dropped

    def restart_part(self) -> None:
        """Forget what the current part sent (it is asked for again): the caller drops what
        this part made go out."""
        if not self._parts:
            self._placeholder = None  # it went out with the first part's first frame
        self._restart()

    def feed(self, data: bytes) -> bytes:
        """What of the stream can go out now that ``data`` of the current part came:
        its complete audio frames (the first time, the header frame before them)."""
        if self._tail:
            return b""
        pending = self._pending
        pending += data
        out = bytearray()
        if self._skip is None:
            if len(pending) < 10:
                return b""
            self._skip = _skip_id3v2(pending)
        if self._skip:
            dropped = min(self._skip, len(pending))
            del pending[:dropped]
            self._skip -= dropped
            if self._skip:
                return b""
        while len(pending) >= 4:
            header = _header_at(pending, 0)
            if header is None:  # the end of the frames: a trailing tag, or junk
                self._tail = True
                pending.clear()
                break
            if len(pending) < header.length:
                break
            frame = bytes(pending[: header.length])
            del pending[: header.length]
            if self._audio_frame(frame, header):
                if self._placeholder is None:
                    assert self._part is not None
                    self._placeholder = _header_frame([self._part], None, 0)
                    out += self._placeholder
                out += frame
        return bytes(out)

    def _audio_frame(self, frame: bytes, header: _Header) -> bool:
        """Counts ``frame`` into the current part; ``False`` for its header frame."""
        index = len(self._parts)
        part = self._part
        if part is None:
            part = self._part = _Part(first=header, bitrates=set())
            if self._parts and header.stream != self._parts[0].first.stream:
                raise InternalError("MP3 parts differ in sample rate or channels")
            if _read_vbr_header(frame, header, part):
                return False
        elif header.stream != part.first.stream:
            raise InternalError(f"MP3 part {index} changes its sample rate or channels")
        part.frame_count += 1
        part.bitrates.add(header.bitrate_index)
        part.audio_bytes += len(frame)
        return True

    def end_part(self) -> bytes:
        """The current part is complete (a cut-off last frame or a tag after the frames
        is dropped). Returns what goes out now: nothing, every frame went out whole."""
        index = len(self._parts)
        if self._part is None or not self._part.frame_count:
            raise InternalError(f"MP3 part {index} holds no MPEG Layer III audio frame")
        self._frames_before.append(sum(p.frame_count for p in self._parts))
        self._parts.append(self._part)
        self._restart()
        return b""

    def finish(self) -> bytes:
        """The header frame with the counts, to write over the first bytes of the stream
        (the placeholder, of the same length). Raises :class:`InternalError` without
        parts."""
        if not self._parts:
            raise InternalError("no MP3 parts to join")
        frames = sum(p.frame_count for p in self._parts)
        audio = sum(p.audio_bytes for p in self._parts)
        return _header_frame(self._parts, frames, audio)

    def part_starts(self) -> list[float]:
        """Where each part's own time 0 plays in the joined stream, in seconds: after
        the frames before it, its own encoder delay in, the first part's taken out."""
        if not self._parts:
            return []
        first = self._parts[0]
        rate, spf = first.first.sample_rate, first.first.samples
        return [(before * spf + part.delay - first.delay) / rate
                for before, part in zip(self._frames_before, self._parts, strict=True)]


def join_mp3(parts: Sequence[bytes]) -> bytes:
    """One MP3 stream playing ``parts`` one after the other (see the module docstring):
    what :class:`Mp3Joiner` streams, with its final header frame.

    A single part is returned unchanged. Raises :class:`InternalError` when a part holds
    no MPEG Layer III frame or the parts differ in sample rate or channels.
    """
    if not parts:
        raise InternalError("no MP3 parts to join")
    if len(parts) == 1:
        return bytes(parts[0])
    joiner = Mp3Joiner()
    out = bytearray()
    for data in parts:
        out += joiner.feed(bytes(data))
        out += joiner.end_part()
    header = joiner.finish()
    out[: len(header)] = header
    return bytes(out)
