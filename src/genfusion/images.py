"""Reading user images into plain 8-bit RGB, with a clear error for what cannot be read."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from genfusion.errors import GenfusionError

EXIF_ORIENTATION = 0x0112


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def exif_orientation(image: Image.Image) -> int:
    if image.format == "PNG" and "exif" not in image.info:
        # Pillow decodes the whole PNG to find an EXIF chunk after the pixels; walk the chunks
        # instead, so that reading a header never costs the image's memory.
        exif = Image.Exif()
        data = png_exif_after_pixels(image.fp)
        if data:
            exif.load(data)
    else:
        exif = image.getexif()
    orientation = exif.get(EXIF_ORIENTATION, 1)
    return orientation if orientation in range(1, 9) else 1


def png_exif_after_pixels(fp) -> bytes | None:
    """The data of a PNG's eXIf chunk, found by reading each chunk's length and type and seeking
    past its data (nothing is decompressed); None when there is none."""
    position = fp.tell()
    try:
        fp.seek(0)
        if fp.read(8) != PNG_SIGNATURE:
            return None
        while True:
            head = fp.read(8)
            if len(head) < 8:
                return None
            length, kind = struct.unpack(">I4s", head)
            if kind == b"eXIf":
                return fp.read(length)
            if kind == b"IEND":
                return None
            fp.seek(length + 4, 1)  # the chunk's data and CRC
    finally:
        fp.seek(position)


def open_image(path: Path) -> Image.Image:
    """Open lazily (header only), naming the file when it is not an image."""
    try:
        return Image.open(path)
    except FileNotFoundError as exc:
        raise GenfusionError(f"{path}: image file not found") from exc
    except (UnidentifiedImageError, OSError) as exc:
        raise GenfusionError(f"{path}: not a readable image ({exc})") from exc


@dataclass(frozen=True)
class Header:
    raw_size: tuple[int, int]  # (width, height) as stored
    orientation: int  # EXIF orientation, 1 when absent

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) as displayed, once EXIF orientation is applied."""
        width, height = self.raw_size
        return (height, width) if self.orientation in (5, 6, 7, 8) else (width, height)


def read_header(path: Path) -> Header:
    """Size and orientation without decoding the pixels (a PNG may keep EXIF after them)."""
    with open_image(path) as image:
        try:
            return Header(image.size, exif_orientation(image))
        except (OSError, SyntaxError, ValueError, struct.error) as exc:
            raise GenfusionError(f"{path}: corrupt or truncated image ({exc})") from exc


def to_rgb(image: Image.Image, path: Path) -> tuple[Image.Image, tuple[str, ...]]:
    """Decode, apply EXIF orientation and convert to 8-bit RGB.

    Returns the image and each kind of conversion that changed its pixel values (for the import
    report): empty when the image was already 8-bit RGB.
    """
    # Pillow reads a 16-bit colour PNG as 8-bit RGB(A) (its high bytes) without saying so: only
    # the decoder's raw mode tells, and it is gone once the image is loaded.
    deep = image.format == "PNG" and any(";16" in str(tile.args) for tile in image.tile)
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, struct.error) as exc:
        raise GenfusionError(f"{path}: corrupt or truncated image ({exc})") from exc
    mode = image.mode
    reduced = ("16bit",) if deep else ()
    if mode == "RGB":
        return image, reduced
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Aerial and microscope images use alpha for no-data; black is the usual fill.
        background = Image.new("RGB", image.size)
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background, (*reduced, "alpha")
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        # Full 16-bit range to 8 bits; a 32-bit image holding 8-bit values is kept as is.
        scale = 255.0 / 65535.0 if values.max(initial=0) > 255 else 1.0
        gray = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB"), ("16bit", "grayscale")
    if mode in ("L", "1"):
        return image.convert("RGB"), (*reduced, "grayscale")
    if mode in ("P", "CMYK", "YCbCr", "LAB", "HSV"):
        return image.convert("RGB"), (mode.lower(),)
    raise GenfusionError(
        f"{path}: unsupported pixel mode {mode!r}; convert it to 8-bit RGB, grayscale or 16-bit grayscale"
    )
