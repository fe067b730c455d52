"""Real objects and where new ones go, for the stages that add objects to the real train tiles
(composite pastes cut-outs of them, inpaint paints new ones into drawn layouts): the tiles with
their boxes, the cut-outs, where the real boxes lie, the plan of one image's new objects, and
which labels the later objects hide.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from genfusion import layout
from genfusion.boxes import Box
from genfusion.errors import GenfusionError
from genfusion.formats.yolo import read_label_file
from genfusion.images import open_image, to_rgb

if TYPE_CHECKING:
    from genfusion.params import LayoutParams


@dataclass(frozen=True)
class Tile:
    """A real train tile: its pixels (H x W x 3, uint8) and objects."""

    stem: str
    path: Path
    pixels: np.ndarray
    boxes: tuple[Box, ...]
    sha256: str

    @property
    def size(self) -> tuple[int, int]:
        return self.pixels.shape[1], self.pixels.shape[0]


@dataclass(frozen=True)
class Instance:
    """One cut-out object: its pixels and its mask (1 inside the box or outline), and the outline
    in the cut-out's own pixels (empty for a box)."""

    source: str  # <tile stem>#<line of its label file>
    label: str
    pixels: np.ndarray
    mask: np.ndarray
    polygon: tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class BoxStatistics:
    """Where the real train tiles' boxes are and how many a tile holds."""

    counts: np.ndarray  # boxes per tile
    centres: np.ndarray  # (N, 2) fractions of the tile's width and height


@dataclass(frozen=True)
class Placement:
    """Where and how one cut-out is pasted."""

    instance: int
    x: int
    y: int
    width: int
    height: int
    turns: int  # quarter turns, counter-clockwise
    mirror: bool
    colour: tuple[float, float, float]  # brightness, contrast, saturation factors


def load_tiles(real: Path, names: Sequence[str]) -> list[Tile]:
    """Every real train tile with its objects, in file-name order; every tile needs its label."""
    tiles = []
    for image in layout.image_files(real, "train"):
        label = layout.label_file(real, image.stem, "train")
        if not label.is_file():
            raise GenfusionError(
                f"{label} is missing; every real train tile needs its YOLO label file"
                " (empty when the tile has no objects)"
            )
        data = image.read_bytes()
        with open_image(image) as raw:
            pixels = np.asarray(to_rgb(raw, image)[0])
        size = (pixels.shape[1], pixels.shape[0])
        boxes = tuple(read_label_file(label, names, size))
        tiles.append(Tile(image.stem, image, pixels, boxes, hashlib.sha256(data).hexdigest()))
    if not tiles:
        raise GenfusionError(
            f"{layout.images_dir(real, 'train')} holds no train tiles; run `dvc repro seeds`"
        )
    return tiles


def cut_instances(tiles: Sequence[Tile], settings: LayoutParams, task: str) -> list[Instance]:
    """Every object at least `settings.min_size` px on each side, cut to its box (its outline's
    bounds for `segment`), with its mask."""
    import cv2

    instances = []
    for tile in tiles:
        width, height = tile.size
        for number, box in enumerate(tile.boxes, 1):
            x0, y0 = max(int(np.floor(box.x0)), 0), max(int(np.floor(box.y0)), 0)
            x1, y1 = min(int(np.ceil(box.x1)), width), min(int(np.ceil(box.y1)), height)
            if x1 - x0 < settings.min_size or y1 - y0 < settings.min_size:
                continue
            mask = np.ones((y1 - y0, x1 - x0), np.uint8)
            polygon: tuple[tuple[float, float], ...] = ()
            if task == "segment":
                polygon = tuple((x - x0, y - y0) for x, y in box.polygon)
                mask = np.zeros_like(mask)
                cv2.fillPoly(mask, [np.round(np.array(polygon)).astype(np.int32)], 1)
            pixels = np.ascontiguousarray(tile.pixels[y0:y1, x0:x1])
            instances.append(Instance(f"{tile.stem}#{number}", box.label, pixels, mask, polygon))
    if not instances:
        section = settings.section
        raise GenfusionError(
            f"{section}: no object of the real train tiles is at least {section}.min_size"
            f" ({settings.min_size}) px wide and high; lower {section}.min_size"
        )
    return instances


def box_statistics(tiles: Sequence[Tile]) -> BoxStatistics:
    boxes = [(box, tile.size) for tile in tiles for box in tile.boxes]
    if not boxes:
        raise GenfusionError("the real train tiles hold no objects to take sizes and places from")
    return BoxStatistics(
        counts=np.array([len(tile.boxes) for tile in tiles]),
        centres=np.array([((box.x0 + box.x1) / 2 / w, (box.y0 + box.y1) / 2 / h) for box, (w, h) in boxes]),
    )


def plan(
    rng: np.random.Generator,
    background: Tile,
    instances: Sequence[Instance],
    statistics: BoxStatistics,
    settings: LayoutParams,
    *,
    flip: bool = False,
    colour_jitter: float = 0.0,
) -> list[Placement]:
    """The objects one composite pastes, or the boxes one inpainted image's layout holds, drawn
    in a fixed order from `rng`. A pasted object may be mirrored (`flip`) and have its colour
    jittered; a layout box has neither, though its three colour factors are drawn all the same,
    so that one seed places the same boxes for both stages."""
    width, height = background.size
    count = max(1, round(settings.density * statistics.counts[rng.integers(len(statistics.counts))]))
    low, high = settings.scale
    placements = []
    for _ in range(count):
        index = int(rng.integers(len(instances)))
        turns = int(rng.integers(4)) if settings.rotate else 0
        mirror = bool(rng.random() < 0.5) if flip else False
        cut_height, cut_width = instances[index].mask.shape
        if turns % 2:
            cut_width, cut_height = cut_height, cut_width
        factor = rng.uniform(low, high)
        w, h = max(2, round(cut_width * factor)), max(2, round(cut_height * factor))
        if w > width or h > height:
            section = settings.section
            raise GenfusionError(
                f"{section}: an object of {w} x {h} px does not fit on the {width} x {height} px"
                f" background {background.path}; lower {section}.scale (now {list(settings.scale)})"
            )
        cx, cy = statistics.centres[rng.integers(len(statistics.centres))] * (width, height)
        cx += rng.uniform(-0.5, 0.5) * w
        cy += rng.uniform(-0.5, 0.5) * h
        x = int(np.clip(round(cx - w / 2), 0, width - w))
        y = int(np.clip(round(cy - h / 2), 0, height - h))
        colour = tuple(float(f) for f in 1 + rng.uniform(-colour_jitter, colour_jitter, 3))
        placements.append(Placement(index, x, y, w, h, turns, mirror, colour))
    return placements


@dataclass(frozen=True)
class Footprint:
    """A pasted object's own pixels: its mask, top-left corner at (x, y) of the composite."""

    x: int
    y: int
    mask: np.ndarray


def settle_occlusion(
    boxes: Sequence[Box], footprints: Sequence[Footprint | None], order: np.ndarray, max_occlusion: float
) -> list[Box]:
    """The labels once every object is covered by those pasted after it.

    `order` holds, per pixel, 1 + the index (in `boxes`) of the last pasted object covering it,
    0 where none. Object k's own pixels are its footprint (a background object, None: its whole
    box); its hidden share is the share of them with a later order. An object hidden more than
    `max_occlusion`, or wholly, is dropped; a box partly hidden shrinks to the bounds of its
    visible pixels. Linear in the objects' total area."""
    kept = []
    height, width = order.shape
    for k, (box, footprint) in enumerate(zip(boxes, footprints, strict=True)):
        if footprint is None:
            x0, y0 = max(int(np.floor(box.x0)), 0), max(int(np.floor(box.y0)), 0)
            x1, y1 = min(int(np.ceil(box.x1)), width), min(int(np.ceil(box.y1)), height)
            mine = np.ones((max(y1 - y0, 0), max(x1 - x0, 0)), bool)
        else:
            x0, y0, mine = footprint.x, footprint.y, footprint.mask.astype(bool)
        hidden = (order[y0 : y0 + mine.shape[0], x0 : x0 + mine.shape[1]] > k + 1) & mine
        visible = mine & ~hidden
        if not visible.any() or hidden.sum() / mine.sum() > max_occlusion:
            continue
        if not hidden.any() or box.polygon:
            kept.append(box)
            continue
        rows, cols = np.nonzero(visible)
        bounds = (
            x0 + int(cols.min()),
            y0 + int(rows.min()),
            x0 + int(cols.max()) + 1,
            y0 + int(rows.max()) + 1,
        )
        kept.append(box.intersect(*bounds))
    return kept
