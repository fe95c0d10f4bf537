"""Joining Ogg Opus parts into one logical stream, page by page, as they arrive, without
re-encoding.

ElevenLabs speaks a long text in several requests, and the local voice a text sentence by
sentence; each Opus answer is an Ogg stream of its own (``OpusHead`` and ``OpusTags``
pages, then audio pages, the last one marked end-of-stream). Chaining them would be valid
Ogg, but readers (libsndfile, mutagen) take a chained file's first link for all of it. So
:class:`OggOpusJoiner` makes one logical stream of them:

- the first part's pages go out as they are (as its bytes arrive), but for its last page,
  which loses its end-of-stream mark;
- every later part loses its two header packets' pages; its audio pages take the first
  part's serial number, the next page sequence numbers, granule positions counted on
  from the parts before it, and a new checksum.

The granule positions count every sample of every packet (:func:`packet_samples`), so an
inner part's pre-skip and end padding (a few ms of decoder warm-up and silence) are
played, like the encoder delay at an MP3 joint; only the first part's pre-skip and the
last part's end trimming apply. Nothing needs the end, so the stream is the file byte for
byte; a later part's page goes out when it is complete.
"""

from __future__ import annotations

import struct
import zlib

from schemas.errors import InternalError

__all__ = ["OggOpusJoiner", "ogg_crc", "packet_samples"]

_HEADER = struct.Struct("<4sBBqIIIB")  # capture, version, flags, granule, serial, seq, crc, n
_CONTINUED, _BOS, _EOS = 0x01, 0x02, 0x04
_NO_GRANULE = -1
_REVERSED = bytes(int(f"{b:08b}"[::-1], 2) for b in range(256))


def ogg_crc(page: bytes) -> int:
    """Ogg's page checksum (CRC-32, polynomial 0x04C11DB7, not reflected, no inversion) of
    ``page`` with its checksum field zeroed: zlib's reflected CRC-32 on bit-reversed bytes,
    reversed back (C speed instead of a Python loop)."""
    reflected = zlib.crc32(page.translate(_REVERSED), 0xFFFFFFFF) ^ 0xFFFFFFFF
    return int(f"{reflected:032b}"[::-1], 2)


def packet_samples(packet: bytes) -> int:
    """Samples at 48 kHz that one Opus packet decodes to (RFC 6716, 3.1: the TOC byte's
    frame size and code, and for code 3 the frame count). Raises :class:`InternalError`
    for an empty or malformed packet."""
    if not packet:
        raise InternalError("an Opus packet is empty")
    config, code = packet[0] >> 3, packet[0] & 0x03
    if config < 12:  # SILK: 10, 20, 40, 60 ms
        frame = (480, 960, 1920, 2880)[config % 4]
    elif config < 16:  # hybrid: 10, 20 ms
        frame = (480, 960)[config % 2]
    else:  # CELT: 2.5, 5, 10, 20 ms
        frame = (120, 240, 480, 960)[config % 4]
    if code == 0:
        return frame
    if code in (1, 2):
        return 2 * frame
    if len(packet) < 2:
        raise InternalError("an Opus packet of code 3 has no frame count")
    return (packet[1] & 0x3F) * frame


class _Page:
    def __init__(self, raw: bytes) -> None:
        (_, _, self.flags, self.granule, self.serial, self.seq, _,
         count) = _HEADER.unpack_from(raw)
        self.lacing = raw[27 : 27 + count]
        self.body = raw[27 + count :]


class OggOpusJoiner:
    """Ogg Opus parts, given in order as their bytes arrive, as one logical stream (see
    the module docstring): :meth:`feed` the current part's bytes and send what it returns,
    :meth:`end_part` at each part's end. ``parts`` is how many there are (the last keeps
    its end-of-stream page).

    Raises :class:`InternalError` for a part that is not Ogg Opus, has another channel
    count than the first, or ends inside a page.
    """

    def __init__(self, parts: int) -> None:
        if parts < 1:
            raise ValueError(f"parts must be >= 1, got {parts}")
        self._parts = parts
        self._index = 0  # the current part
        self._serial: int | None = None  # the first part's, the stream's
        self._channels: int | None = None
        self._next_seq = 0
        self._seq_at_part = 0  # the sequence number the current part's first page takes
        self._base = 0  # samples of the parts before the current one
        self._starts: list[float] = []
        self._pre_skip0 = 0
        self._restart()

    def _restart(self) -> None:
        self._pending = bytearray()
        self._passed = 0  # bytes of the pending page already sent (first part, as it came)
        self._packets = 0  # packets of the current part ended so far
        self._samples = 0  # their samples (audio packets)
        self._open: bytearray | None = None  # the start of a packet continued on the next page
        self._pre_skip = 0

    def restart_part(self) -> None:
        """Forget what the current part sent (it is asked for again): the caller drops what
        this part made go out."""
        if self._index == 0:
            self._serial = self._channels = None
        self._next_seq = self._seq_at_part
        self._restart()

    def feed(self, data: bytes) -> bytes:
        """What of the stream can go out now that ``data`` of the current part came."""
        pending = self._pending
        pending += data
        out = bytearray()
        while len(pending) >= 27:
            if pending[:4] != b"OggS":
                raise InternalError(f"Opus part {self._index} is not an Ogg stream")
            count = pending[26]
            if len(pending) < 27 + count:
                break
            size = 27 + count + sum(pending[27 : 27 + count])
            flags = pending[5]
            as_is = self._index == 0 and not (flags & _EOS and self._parts > 1)
            if as_is and len(pending) > self._passed:  # the first part: out as it comes
                end = min(len(pending), size)
                out += pending[self._passed : end]
                self._passed = end
            if len(pending) < size:
                break
            page = _Page(bytes(pending[:size]))
            del pending[:size]
            self._passed = 0
            rewritten = self._page(page)
            if not as_is and rewritten is not None:
                out += rewritten
        return bytes(out)

    def _page(self, page: _Page) -> bytes | None:
        """Counts ``page``'s packets; returns it as it goes out (``None``: it does not)."""
        headers = self._packets < 2
        ended_audio = False
        start = 0
        for position, lace in enumerate(page.lacing):
            end = start + lace
            if self._open is None:
                self._open = bytearray()
            self._open += page.body[start:end]
            start = end
            if lace == 255 and position == len(page.lacing) - 1:
                break  # continued on the next page
            if lace < 255:
                self._packet(bytes(self._open))
                self._open = None
                ended_audio = ended_audio or self._packets > 2
        if headers and ended_audio:
            raise InternalError(f"Opus part {self._index} has audio on a header page")
        if self._index == 0:
            if not (page.flags & _EOS and self._parts > 1):
                if self._serial is None:
                    self._serial = page.serial
                self._next_seq = page.seq + 1
                return None  # sent as it came
            return self._rewritten(page, page.flags & ~_EOS, self._samples)
        if headers:
            return None  # the stream has its headers: the first part's
        last = self._index == self._parts - 1
        if last and page.flags & _EOS:
            return self._rewritten(page, page.flags, self._base + page.granule)
        flags = page.flags & ~_EOS
        granule = self._base + self._samples if ended_audio else _NO_GRANULE
        return self._rewritten(page, flags, granule)

    def _packet(self, packet: bytes) -> None:
        index = self._packets
        self._packets += 1
        if index == 0:
            if packet[:8] != b"OpusHead" or len(packet) < 19:
                raise InternalError(f"Opus part {self._index} does not start with OpusHead")
            channels, self._pre_skip = packet[9], struct.unpack_from("<H", packet, 10)[0]
            if self._channels is None:
                self._channels, self._pre_skip0 = channels, self._pre_skip
            elif channels != self._channels:
                raise InternalError("Opus parts differ in channel count")
        elif index >= 2:
            self._samples += packet_samples(packet)

    def _rewritten(self, page: _Page, flags: int, granule: int) -> bytes:
        assert self._serial is not None
        header = _HEADER.pack(b"OggS", 0, flags, granule, self._serial, self._next_seq, 0,
                              len(page.lacing))
        self._next_seq += 1
        raw = bytearray(header + page.lacing + page.body)
        struct.pack_into("<I", raw, 22, ogg_crc(bytes(raw)))
        return bytes(raw)

    def end_part(self) -> bytes:
        """The current part is complete. Returns what goes out now (nothing: each page
        went out when complete)."""
        if self._pending or self._open:
            raise InternalError(f"Opus part {self._index} ends inside an Ogg page")
        if self._packets < 3:
            raise InternalError(f"Opus part {self._index} holds no audio")
        self._starts.append((self._base + self._pre_skip - self._pre_skip0) / 48_000)
        self._base += self._samples
        self._index += 1
        self._seq_at_part = self._next_seq
        self._restart()
        return b""

    def finish(self) -> None:
        """Nothing to write over: every page went out final."""

    def part_starts(self) -> list[float]:
        """Where each part's own time 0 plays in the joined stream, in seconds: after the
        samples before it, its own pre-skip in, the first part's taken out."""
        return list(self._starts)
