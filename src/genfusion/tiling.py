"""Pure geometry of the seeds stage: tile windows, boxes (and outlines) cut by tiles, splits, EXIF frames."""

from __future__ import annotations

import hashlib
from bisect import bisect_left, bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from genfusion.boxes import Box, polygon_box


@dataclass(frozen=True)
class Window:
    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0


def _starts(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    # The last tile is aligned to the far edge so the whole image is covered
    # without padding; it overlaps its neighbour a little more than the others.
    starts.append(length - tile)
    return starts


def tile_windows(width: int, height: int, tile: int, overlap: int) -> list[Window]:
    """Windows of at most `tile` px that cover the image, row by row.

    An image no larger than a tile is one window of its own size (never padded).
    """
    stride = tile - overlap
    return [
        Window(x, y, min(x + tile, width), min(y + tile, height))
        for y in _starts(height, tile, stride)
        for x in _starts(width, tile, stride)
    ]


@dataclass(frozen=True)
class CutBoxes:
    boxes: tuple[Box, ...]  # in the window's own coordinates
    cut: int  # boxes kept although the window edge cut part of them
    dropped: int  # boxes touching the window but less visible than the minimum


def boxes_in_window(
    boxes: Sequence[Box], window: Window, min_visibility: float, min_box_size: float
) -> CutBoxes:
    kept: list[Box] = []
    cut = dropped = 0
    for box in boxes:
        inside = box.clip(window.x0, window.y0, window.x1, window.y1)
        if inside.area == 0:
            continue  # not in this window at all
        if inside.area < box.area * min_visibility or min(inside.width, inside.height) < min_box_size:
            dropped += 1
            continue
        cut += inside != box
        kept.append(inside.shift(-window.x0, -window.y0))
    return CutBoxes(tuple(kept), cut, dropped)


def tile_boxes(
    boxes: Sequence[Box],
    size: tuple[int, int],
    tile: int,
    overlap: int,
    min_visibility: float,
    min_box_size: float,
) -> list[tuple[Window, CutBoxes]]:
    """Every tile window of an image of `size` with the boxes it keeps (as `boxes_in_window`).

    Each box is given only to the windows it can touch, found by bisecting the sorted window
    starts, so the cost grows with boxes x windows a box spans, not boxes x windows: a 12,000 px
    orthomosaic has thousands of windows and tens of thousands of boxes.
    """
    width, height = size
    stride = tile - overlap
    xs, ys = _starts(width, tile, stride), _starts(height, tile, stride)
    touching: list[list[int]] = [[] for _ in range(len(xs) * len(ys))]
    for index, box in enumerate(boxes):
        # A window starting at s spans [s, s + tile): it can touch the box when x0 - tile < s < x1.
        columns = range(bisect_right(xs, box.x0 - tile), bisect_left(xs, box.x1))
        for row in range(bisect_right(ys, box.y0 - tile), bisect_left(ys, box.y1)):
            for column in columns:
                touching[row * len(xs) + column].append(index)
    windows = tile_windows(width, height, tile, overlap)
    return [
        (window, boxes_in_window([boxes[i] for i in found], window, min_visibility, min_box_size))
        for window, found in zip(windows, touching, strict=True)
    ]


def _stable_rank(seed: int, name: str) -> str:
    return hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()


def assign_splits(
    group_sizes: Mapping[str, int], fractions: Mapping[str, float], seed: int
) -> dict[str, str]:
    """Give each group (a scene, or a single tile) a split; deterministic for a seed.

    Largest groups first (ties in a seeded random order), each to the split that is
    furthest below its target share of items; ties go to the earlier split in
    `fractions`. When only as many groups are left as splits still empty, they go to
    those splits, so that a few scenes still give a train, a val and a test split.
    A group never straddles two splits, so neighbouring tiles of one scene cannot
    leak from train into test.
    """
    total = sum(group_sizes.values())
    target = {split: fraction * total for split, fraction in fractions.items()}
    filled = dict.fromkeys(fractions, 0)
    order = sorted(group_sizes, key=lambda g: (-group_sizes[g], _stable_rank(seed, g)))
    assignment = {}
    for done, group in enumerate(order):
        empty = [s for s in fractions if fractions[s] > 0 and filled[s] == 0]
        candidates = empty if len(empty) >= len(order) - done else list(fractions)
        split = max(candidates, key=lambda s: target[s] - filled[s])
        assignment[group] = split
        filled[split] += group_sizes[group]
    return assignment


def exif_point(x: float, y: float, width: int, height: int, orientation: int) -> tuple[float, float]:
    """Where the point (x, y) of the stored image lands once EXIF `orientation` is applied.

    `width` x `height` is the stored (raw) size; this is the mapping PIL's
    `ImageOps.exif_transpose` applies to pixels.
    """
    return {
        1: (x, y),
        2: (width - x, y),
        3: (width - x, height - y),
        4: (x, height - y),
        5: (y, x),
        6: (height - y, x),
        7: (height - y, width - x),
        8: (y, width - x),
    }[orientation]


def exif_box(box: Box, width: int, height: int, orientation: int) -> Box:
    if box.polygon:
        return polygon_box(box.label, [exif_point(x, y, width, height, orientation) for x, y in box.polygon])
    ax, ay = exif_point(box.x0, box.y0, width, height, orientation)
    bx, by = exif_point(box.x1, box.y1, width, height, orientation)
    return Box(box.label, min(ax, bx), min(ay, by), max(ax, bx), max(ay, by))
