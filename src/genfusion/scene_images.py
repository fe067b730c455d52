"""Scenes of any size read window by window: the seeds stage's tiles, the test scene sets, predict.

An 8-bit grey, RGB or RGBA (Geo)TIFF in EXIF orientation 1 is read through rasterio one window at a
time, GDAL's block cache capped, so an orthomosaic larger than memory never sits in it whole. Every
other image is decoded once by Pillow (EXIF orientation applied, 16-bit and palette images
converted, as `images.to_rgb` does), which holds it whole: `seeds.max_pixels` bounds that instead of
Pillow's own decompression-bomb limit, and the error names the file, its size and the param.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from genfusion.errors import GenfusionError
from genfusion.images import open_image, read_header, to_rgb
from genfusion.tiling import Window

RASTER_SUFFIXES = (".tif", ".tiff")
GDAL_CACHE_MB = 64
# Rows of this many px are copied at a time into a tiled GeoTIFF: a few blocks' height of memory.
COPY_ROWS = 1024


class SceneImage(Protocol):
    path: Path
    size: tuple[int, int]  # (width, height)
    crs: object | None  # a georeferenced raster's CRS (rasterio's), else None
    transform: object | None  # its pixel-to-map affine transform, when it has a CRS
    conversions: tuple[str, ...]  # how its pixels became 8-bit RGB (`images.to_rgb`'s names)

    def read(self, window: Window) -> np.ndarray:
        """The window's pixels, (height, width, 3) 8-bit RGB."""
        ...

    def preview(self, longest: int) -> np.ndarray:
        """The whole scene scaled to at most `longest` px a side (never up), 8-bit RGB."""
        ...

    def close(self) -> None: ...


@contextmanager
def pillow_limit_lifted() -> Iterator[None]:
    """Pillow's decompression-bomb check off while user images are opened: it raises for images
    over 179 megapixels (an ordinary orthomosaic) without naming the file; windowed reads need no
    limit and `PillowScene` applies `seeds.max_pixels` to what it decodes whole."""
    before = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = before


class PillowScene:
    """An image Pillow reads, decoded once and held whole; `max_pixels` None for the project's own
    files (a scene set's copies), else the param that bounds it."""

    def __init__(self, path: Path, max_pixels: int | None):
        self.path = Path(path)
        with pillow_limit_lifted(), open_image(self.path) as raw:
            check_pixel_count(self.path, raw.size, max_pixels)
            # Kept as Pillow holds it, and cut per window: a numpy copy of the whole scene would
            # nearly double the peak memory.
            self.image, self.conversions = to_rgb(raw, self.path)
        self.size = self.image.size
        self.crs = None
        self.transform = None

    def read(self, window: Window) -> np.ndarray:
        return np.asarray(self.image.crop((window.x0, window.y0, window.x1, window.y1)))

    def preview(self, longest: int) -> np.ndarray:
        small = self.image.copy()
        small.thumbnail((longest, longest))
        return np.asarray(small)

    def close(self) -> None:
        pass


def check_pixel_count(path: Path, size: tuple[int, int], max_pixels: int | None) -> None:
    width, height = size
    if max_pixels is not None and width * height > max_pixels:
        raise GenfusionError(
            f"{path}: {width} x {height} px ({width * height / 1e6:.0f} megapixels) is over"
            f" seeds.max_pixels ({max_pixels:,}), and this image is decoded whole: convert it to an"
            " 8-bit tiled GeoTIFF, which is read window by window (gdal_translate -ot Byte -co"
            " TILED=YES), or raise seeds.max_pixels if memory allows (decoding takes about 8 bytes a pixel)"
        )


class RasterScene:
    """A (Geo)TIFF of 8-bit grey, RGB or RGBA bands read window by window with rasterio."""

    def __init__(self, path: Path):
        import rasterio
        from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

        self.path = Path(path)
        # GDAL keeps every decoded block by default (up to 5 % of RAM), so memory would grow with
        # the scene; windows go row by row, and a few rows of blocks is all they reuse.
        self.env = rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB)
        self.env.__enter__()
        try:
            with warnings.catch_warnings():  # predict says itself when there is no CRS, once
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                self.source = rasterio.open(self.path)
        except RasterioIOError as exc:
            self.env.__exit__(None, None, None)
            raise GenfusionError(f"{self.path}: not a readable image ({exc})") from exc
        source = self.source
        problem = unsupported_bands(source)
        if problem:
            self.close()
            raise GenfusionError(
                f"{self.path}: {problem}; 8-bit grey, RGB or RGBA rasters are read: convert it first"
                " (e.g. gdal_translate -ot Byte -scale -b 1 -b 2 -b 3)"
            )
        self.bands = [1, 1, 1] if source.count == 1 else [1, 2, 3]
        self.alpha = source.count == 4
        self.conversions = {1: ("grayscale",), 3: (), 4: ("alpha",)}[source.count]
        self.size = (source.width, source.height)
        self.crs = source.crs
        self.transform = source.transform if source.crs is not None else None
        self.profile = source.profile

    def read(self, window: Window) -> np.ndarray:
        from rasterio.windows import Window as RasterWindow

        return self._bands(window=RasterWindow(window.x0, window.y0, window.width, window.height))

    def preview(self, longest: int) -> np.ndarray:
        from rasterio.enums import Resampling

        scale = min(1.0, longest / max(self.size))
        shape = (max(1, round(self.size[1] * scale)), max(1, round(self.size[0] * scale)))
        # Decimated by GDAL (from the raster's overviews when it has them), never read whole.
        return self._bands(out_shape=shape, resampling=Resampling.average)

    def _bands(self, **how) -> np.ndarray:
        shape = how.pop("out_shape", None)
        sized = {"out_shape": (3, *shape)} if shape else {}
        pixels = np.moveaxis(self.source.read(self.bands, **sized, **how), 0, -1)
        if self.alpha:  # composited onto black, as the seeds stage does with an alpha channel
            sized = {"out_shape": shape} if shape else {}
            alpha = self.source.read(4, **sized, **how)[..., None].astype(np.uint16)
            pixels = ((pixels * alpha + 127) // 255).astype(np.uint8)
        return pixels

    def close(self) -> None:
        self.source.close()
        self.env.__exit__(None, None, None)


def unsupported_bands(source) -> str | None:
    """Why rasterio's bands are not 8-bit grey, RGB or RGBA (None when they are): a palette,
    CMYK, or a fourth band that is not alpha reads as colours only through Pillow."""
    from rasterio.enums import ColorInterp

    if source.count not in (1, 3, 4) or set(source.dtypes) != {"uint8"}:
        return f"{source.count} band(s) of {'/'.join(sorted(set(source.dtypes)))}"
    interpretation = source.colorinterp
    if interpretation[0] == ColorInterp.palette:
        return "a palette image"
    if source.count == 4 and interpretation[3] != ColorInterp.alpha:
        return f"4 bands, the fourth {interpretation[3].name}, not alpha"
    return None


def _windowed(path: Path) -> str | None:
    """Why a TIFF cannot be read window by window (None when it can)."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as source:
                problem = unsupported_bands(source)
    except RasterioIOError as exc:
        return f"not readable by rasterio ({exc})"
    if problem:
        return problem
    try:
        with pillow_limit_lifted():
            orientation = read_header(path).orientation
    except GenfusionError:
        return None  # a TIFF only GDAL reads (JPEG-in-TIFF, BigTIFF) has no orientation Pillow would apply
    # GDAL ignores the TIFF orientation tag, and the seeds stage shows images as their tag says.
    return "rotated by its orientation tag" if orientation != 1 else None


def open_scene(path: Path, max_pixels: int | None) -> PillowScene | RasterScene:
    """A scene reader for `path`: window by window where the format allows, else Pillow (bounded by
    `max_pixels`). A TIFF Pillow cannot read either gets rasterio's reason and advice."""
    path = Path(path)
    if not path.is_file():
        raise GenfusionError(f"{path}: image file not found")
    if path.suffix.lower() not in RASTER_SUFFIXES:
        return PillowScene(path, max_pixels)
    reason = _windowed(path)
    if reason is None:
        return RasterScene(path)
    try:
        with pillow_limit_lifted():
            size = read_header(path).raw_size
    except GenfusionError as exc:
        raise GenfusionError(
            f"{path}: {reason}, and Pillow cannot read it either ({exc}); convert it to an 8-bit"
            " grey, RGB or RGBA GeoTIFF (e.g. gdal_translate -ot Byte -scale -b 1 -b 2 -b 3)"
        ) from exc
    check_pixel_count(path, size, max_pixels)
    return PillowScene(path, None)


def copy_scene(scene: PillowScene | RasterScene, stem: Path) -> Path:
    """The scene as 8-bit RGB beside `stem`: a windowed scene as a tiled GeoTIFF (its CRS kept),
    copied a band of rows at a time, so it is never whole in memory; any other as a PNG."""
    if isinstance(scene, PillowScene):
        out = stem.with_suffix(".png")
        scene.image.save(out)
        return out
    import rasterio
    from rasterio.windows import Window as RasterWindow

    out = stem.with_suffix(".tif")
    width, height = scene.size
    profile = {
        "driver": "GTiff", "width": width, "height": height, "count": 3, "dtype": "uint8",
        "crs": scene.crs, "transform": scene.profile["transform"], "tiled": True,
        "blockxsize": 256, "blockysize": 256, "compress": "deflate", "photometric": "RGB",
    }  # fmt: skip
    with rasterio.open(out, "w", **profile) as target:
        for y0 in range(0, height, COPY_ROWS):
            rows = Window(0, y0, width, min(y0 + COPY_ROWS, height))
            area = RasterWindow(0, y0, width, rows.height)
            target.write(np.moveaxis(scene.read(rows), -1, 0), window=area)
    return out
