"""Small, real MP4 files for the simulator: one H.264 keyframe shown for the whole duration.

The keyframe (SMPTE bars at 854x480 and 1280x720, baseline profile) was
encoded once with ``ffmpeg -f lavfi -i smptebars=s=WxH -frames:v 1 -c:v libx264
-profile:v baseline`` and ships in ``proxy/assets`` as its ``avcC``
configuration and its sample bytes. This module writes the ISO BMFF boxes
(ISO/IEC 14496-12) around it, so the file's duration and size are the job's
own and any player or media library reads them back.
"""

from __future__ import annotations

import struct
from functools import cache, lru_cache
from importlib import resources

TIMESCALE = 1000
FRAME_SIZES = {"480p": (854, 480), "720p": (1280, 720)}
_MATRIX = struct.pack(">9I", 0x00010000, 0, 0, 0, 0x00010000, 0, 0, 0, 0x40000000)


def _box(kind: bytes, *payload: bytes) -> bytes:
    body = b"".join(payload)
    return struct.pack(">I4s", 8 + len(body), kind) + body


def _full_box(kind: bytes, version: int, flags: int, *payload: bytes) -> bytes:
    return _box(kind, struct.pack(">I", (version << 24) | flags), *payload)


@cache
def _frame(resolution: str) -> tuple[bytes, bytes]:
    assets = resources.files("proxy") / "assets"
    return (
        (assets / f"frame-{resolution}.avcc").read_bytes(),
        (assets / f"frame-{resolution}.h264").read_bytes(),
    )


@lru_cache(maxsize=64)
def build_mp4(seconds: int, resolution: str) -> bytes:
    """An MP4 of ``seconds`` at ``resolution`` (``480p`` or ``720p``)."""
    if resolution not in FRAME_SIZES:
        raise ValueError(f"no frame for resolution {resolution!r}")
    if seconds < 1:
        raise ValueError("seconds must be at least 1")
    width, height = FRAME_SIZES[resolution]
    avcc, sample = _frame(resolution)
    duration = seconds * TIMESCALE

    ftyp = _box(b"ftyp", b"isom", struct.pack(">I", 512), b"isomiso2avc1mp41")
    mvhd = _full_box(
        b"mvhd", 0, 0,
        struct.pack(">IIII", 0, 0, TIMESCALE, duration),
        struct.pack(">IH10x", 0x00010000, 0x0100), _MATRIX, bytes(24), struct.pack(">I", 2),
    )
    tkhd = _full_box(
        b"tkhd", 0, 3,
        struct.pack(">III4xI8x", 0, 0, 1, duration),
        struct.pack(">hhH2x", 0, 0, 0), _MATRIX, struct.pack(">II", width << 16, height << 16),
    )
    mdhd = _full_box(b"mdhd", 0, 0, struct.pack(">IIIIHH", 0, 0, TIMESCALE, duration, 0x55C4, 0))
    hdlr = _full_box(b"hdlr", 0, 0, struct.pack(">I4s12x", 0, b"vide"), b"VideoHandler\x00")
    avc1 = _box(
        b"avc1",
        struct.pack(">6xH16xHHIIIH32sHh", 1, width, height, 0x00480000, 0x00480000, 0, 1, b"", 0x0018, -1),
        _box(b"avcC", avcc),
    )
    sample_table_without_offsets = [
        _full_box(b"stsd", 0, 0, struct.pack(">I", 1), avc1),
        _full_box(b"stts", 0, 0, struct.pack(">III", 1, 1, duration)),
        _full_box(b"stsc", 0, 0, struct.pack(">IIII", 1, 1, 1, 1)),
        _full_box(b"stsz", 0, 0, struct.pack(">III", 0, 1, len(sample))),
    ]

    def moov(chunk_offset: int) -> bytes:
        stbl = _box(b"stbl", *sample_table_without_offsets, _full_box(b"stco", 0, 0, struct.pack(">II", 1, chunk_offset)))
        dinf = _box(b"dinf", _full_box(b"dref", 0, 0, struct.pack(">I", 1), _full_box(b"url ", 0, 1)))
        minf = _box(b"minf", _full_box(b"vmhd", 0, 1, bytes(8)), dinf, stbl)
        return _box(b"moov", mvhd, _box(b"trak", tkhd, _box(b"mdia", mdhd, hdlr, minf)))

    header_length = len(ftyp) + len(moov(0)) + 8
    return ftyp + moov(header_length) + _box(b"mdat", sample)
