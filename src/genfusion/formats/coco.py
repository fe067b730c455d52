"""COCO: one JSON object with images, annotations (boxes or polygons) and categories."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from genfusion.boxes import Box, LabelledImage, polygon_box
from genfusion.errors import GenfusionError
from genfusion.formats._common import (
    _annotation_file,
    _find_image,
    _get,
    _get_list,
    _load_json,
    _number,
    _size,
)


def read(source: Path) -> list[LabelledImage]:
    path = _annotation_file(source, (".json",), "JSON")
    data = _load_json(path)
    if not isinstance(data, dict):
        raise GenfusionError(
            f"{path}: not a COCO file: expected a JSON object with 'images', 'annotations' and"
            f" 'categories', got a JSON {type(data).__name__}"
        )
    categories = {}
    for index, category in enumerate(_get_list(data, "categories", str(path))):
        where = f"{path}: categories[{index}]"
        categories[_get(category, "id", where)] = str(_get(category, "name", where))
    images: dict[Any, tuple[Path, tuple[int, int] | None]] = {}
    for index, entry in enumerate(_get_list(data, "images", str(path))):
        where = f"{path}: images[{index}]"
        image_id = _get(entry, "id", where)
        if image_id in images:
            raise GenfusionError(f"{where}: image id {image_id!r} is listed twice")
        name = str(_get(entry, "file_name", where))
        image = _find_image([path.parent / name, path.parent / "images" / name], where, path.parent)
        images[image_id] = (image, _size(entry.get("width"), entry.get("height"), where))
    boxes: dict[Any, list[Box]] = {image_id: [] for image_id in images}
    for index, annotation in enumerate(_get_list(data, "annotations", str(path))):
        where = f"{path}: annotations[{index}]"
        image_id = _get(annotation, "image_id", where)
        if image_id not in images:
            raise GenfusionError(f"{where}: image_id {image_id!r} is not in 'images'")
        category_id = _get(annotation, "category_id", where)
        if category_id not in categories:
            raise GenfusionError(f"{where}: category_id {category_id!r} is not in 'categories'")
        label = categories[category_id]
        if annotation.get("segmentation"):
            boxes[image_id].append(polygon_box(label, _coco_outline(annotation["segmentation"], where)))
            continue
        bbox = _get(annotation, "bbox", where)
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise GenfusionError(f"{where}: bbox must be [x, y, width, height], got {bbox!r}")
        x, y, w, h = (_number(value, f"{where}: bbox[{k}]") for k, value in enumerate(bbox))
        boxes[image_id].append(Box(label, x, y, x + w, y + h))
    return [
        LabelledImage(image, tuple(boxes[image_id]), size, path) for image_id, (image, size) in images.items()
    ]


def _coco_outline(segmentation: Any, where: str) -> list[tuple[float, float]]:
    """The largest polygon of a COCO `segmentation` (YOLO keeps one outline per object)."""
    if not isinstance(segmentation, list):
        raise GenfusionError(
            f"{where}: segmentation is a run-length mask; only polygons ([[x1, y1, x2, y2, ...]])"
            " are read: export the outlines as polygons"
        )
    polygons = []
    for part, flat in enumerate(segmentation):
        if not isinstance(flat, list) or len(flat) < 6 or len(flat) % 2:
            raise GenfusionError(
                f"{where}: segmentation[{part}] must be [x1, y1, x2, y2, x3, y3, ...] (at least 3 points)"
            )
        values = [_number(v, f"{where}: segmentation[{part}][{k}]") for k, v in enumerate(flat)]
        polygons.append(list(zip(values[::2], values[1::2], strict=True)))
    return max(polygons, key=_polygon_area)


def _polygon_area(points: list[tuple[float, float]]) -> float:
    """Shoelace formula."""
    following = points[1:] + points[:1]
    return abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(points, following, strict=True))) / 2
