"""Boxes and labelled images: the one in-memory form every importer produces.

Coordinates are absolute pixels in the displayed image frame (EXIF orientation
applied), x to the right, y down, corners (x0, y0) top-left and (x1, y1) bottom-right.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class Box:
    label: str
    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)

    def intersect(self, x0: float, y0: float, x1: float, y1: float) -> Box:
        """This box cut to the window; the result may have zero area."""
        nx0, ny0 = max(self.x0, x0), max(self.y0, y0)
        nx1, ny1 = min(self.x1, x1), min(self.y1, y1)
        return replace(self, x0=nx0, y0=ny0, x1=max(nx0, nx1), y1=max(ny0, ny1))

    def shift(self, dx: float, dy: float) -> Box:
        return replace(self, x0=self.x0 + dx, y0=self.y0 + dy, x1=self.x1 + dx, y1=self.y1 + dy)


@dataclass(frozen=True)
class LabelledImage:
    """One image and its boxes as an annotation file describes them."""

    image: Path
    boxes: tuple[Box, ...]
    # (width, height) the annotation declares, when the format records it.
    size: tuple[int, int] | None = None
    # The annotation file the boxes came from, for error messages.
    source: Path | None = None


def yolo_line(box: Box, class_id: int, width: int, height: int) -> str:
    """`class cx cy w h`, normalised to the image size (Ultralytics' txt format)."""
    cx = (box.x0 + box.x1) / 2 / width
    cy = (box.y0 + box.y1) / 2 / height
    return f"{class_id} {cx:.6f} {cy:.6f} {box.width / width:.6f} {box.height / height:.6f}"


def parse_yolo_line(line: str, names: list[str], width: int, height: int) -> Box:
    """Inverse of `yolo_line`; raises ValueError on a malformed line or class id."""
    parts = line.split()
    if len(parts) != 5:
        raise ValueError(f"expected 5 numbers (class cx cy w h), got {len(parts)}: {line!r}")
    class_id = int(parts[0])
    if not 0 <= class_id < len(names):
        raise ValueError(f"class id {class_id} is not in 0..{len(names) - 1}")
    cx, cy, w, h = (float(p) for p in parts[1:])
    return Box(
        names[class_id],
        (cx - w / 2) * width,
        (cy - h / 2) * height,
        (cx + w / 2) * width,
        (cy + h / 2) * height,
    )
