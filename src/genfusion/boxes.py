"""Boxes and labelled images: the one in-memory form every importer produces.

Coordinates are absolute pixels in the displayed image frame (EXIF orientation
applied), x to the right, y down, corners (x0, y0) top-left and (x1, y1) bottom-right.
An object may also carry its outline (a polygon) for the segmentation task; its box is
then the polygon's bounds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

Point = tuple[float, float]


@dataclass(frozen=True)
class Box:
    label: str
    x0: float
    y0: float
    x1: float
    y1: float
    # The object's outline, (x, y) vertices in order; empty for a box-only label.
    polygon: tuple[Point, ...] = ()

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)

    @property
    def corners(self) -> tuple[Point, ...]:
        """The box as an outline, clockwise from the top-left corner."""
        return ((self.x0, self.y0), (self.x1, self.y0), (self.x1, self.y1), (self.x0, self.y1))

    def intersect(self, x0: float, y0: float, x1: float, y1: float) -> Box:
        """This box cut to the window; the result may have zero area."""
        nx0, ny0 = max(self.x0, x0), max(self.y0, y0)
        nx1, ny1 = min(self.x1, x1), min(self.y1, y1)
        return replace(self, x0=nx0, y0=ny0, x1=max(nx0, nx1), y1=max(ny0, ny1))

    def clip(self, x0: float, y0: float, x1: float, y1: float) -> Box:
        """The part of the object inside the window: box and outline cut to it; an outline cut
        away entirely leaves a zero-area box."""
        inside = self.intersect(x0, y0, x1, y1)
        if not self.polygon:
            return inside
        polygon = clip_polygon(self.polygon, x0, y0, x1, y1)
        if len(polygon) < 3:
            return replace(inside, x1=inside.x0, y1=inside.y0, polygon=())
        return polygon_box(self.label, polygon)

    def shift(self, dx: float, dy: float) -> Box:
        return replace(
            self,
            x0=self.x0 + dx,
            y0=self.y0 + dy,
            x1=self.x1 + dx,
            y1=self.y1 + dy,
            polygon=tuple((x + dx, y + dy) for x, y in self.polygon),
        )


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes (0 when both are empty)."""
    inter = a.intersect(b.x0, b.y0, b.x1, b.y1).area
    union = a.area + b.area - inter
    return inter / union if union > 0 else 0.0


def polygon_box(label: str, polygon: Sequence[Point]) -> Box:
    """The object an outline describes: its bounds, and the outline."""
    xs, ys = [x for x, _ in polygon], [y for _, y in polygon]
    return Box(label, min(xs), min(ys), max(xs), max(ys), tuple((float(x), float(y)) for x, y in polygon))


def clip_polygon(polygon: Sequence[Point], x0: float, y0: float, x1: float, y1: float) -> tuple[Point, ...]:
    """Sutherland-Hodgman: `polygon` cut to the rectangle (a convex window, so the result is
    exact; a concave outline cut in two stays one polygon joined along the window edge)."""
    edges = (
        (lambda p: p[0] >= x0, lambda a, b: _cross_x(a, b, x0)),
        (lambda p: p[0] <= x1, lambda a, b: _cross_x(a, b, x1)),
        (lambda p: p[1] >= y0, lambda a, b: _cross_y(a, b, y0)),
        (lambda p: p[1] <= y1, lambda a, b: _cross_y(a, b, y1)),
    )
    points = list(polygon)
    for inside, crossing in edges:
        kept: list[Point] = []
        for k, current in enumerate(points):
            previous = points[k - 1]
            if inside(current):
                if not inside(previous):
                    kept.append(crossing(previous, current))
                kept.append(current)
            elif inside(previous):
                kept.append(crossing(previous, current))
        points = kept
    return tuple(points)


def _cross_x(a: Point, b: Point, x: float) -> Point:
    return x, a[1] + (b[1] - a[1]) * (x - a[0]) / (b[0] - a[0])


def _cross_y(a: Point, b: Point, y: float) -> Point:
    return a[0] + (b[0] - a[0]) * (y - a[1]) / (b[1] - a[1]), y


@dataclass(frozen=True)
class LabelledImage:
    """One image and its boxes as an annotation file describes them."""

    image: Path
    boxes: tuple[Box, ...]
    # (width, height) the annotation declares, when the format records it.
    size: tuple[int, int] | None = None
    # The annotation file the boxes came from, for error messages.
    source: Path | None = None
