"""PNG files that Pillow cannot write, built chunk by chunk: 16-bit colour, an EXIF block after the
pixels, and oversized images that are small on disk."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


SIGNATURE = b"\x89PNG\r\n\x1a\n"


def deep_png(pixels: np.ndarray) -> bytes:
    """A 16-bit RGB or RGBA PNG file of `pixels` (H x W x 3 or 4, uint16), as an encoder other
    than Pillow's writes it (Pillow writes no 16-bit colour PNG)."""
    height, width, channels = pixels.shape
    colour = {3: 2, 4: 6}[channels]
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)
    return (
        SIGNATURE
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, colour, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def write_png(path: Path, width: int, height: int, exif_after_pixels: bytes = b"") -> None:
    """A whole, valid 8-bit RGB PNG of black pixels, compressed row by row (a 14,000 x 13,000 px
    one is a few hundred kB on disk and 546 MB decoded), with an eXIf chunk after the pixels when
    given (where Pillow looks for it only by decoding the image)."""
    pixels = zlib.compressobj(9)
    row = bytes(1 + 3 * width)  # filter byte 0, then the row's pixels
    with path.open("wb") as f:
        f.write(SIGNATURE + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)))
        data = b"".join(pixels.compress(row) for _ in range(height)) + pixels.flush()
        f.write(chunk(b"IDAT", data))
        if exif_after_pixels:
            f.write(chunk(b"eXIf", exif_after_pixels))
        f.write(chunk(b"IEND", b""))
