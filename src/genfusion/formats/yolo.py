"""YOLO: a data .yaml naming image folders, and one label file per image (`labels/` beside
`images/`), a line per object: `class cx cy w h`, or `class x1 y1 x2 y2 ...` for an outline,
as fractions of the image size. The one reader and writer of YOLO label lines in the project."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from genfusion.boxes import Box, LabelledImage, polygon_box
from genfusion.errors import GenfusionError
from genfusion.formats._common import (
    ANY_IMAGE,
    IMAGE_EXTENSIONS,
    YAML_SUFFIXES,
    _annotation_file,
    _files,
    _finite,
    _get,
    _inside,
    _no_label_error,
)
from genfusion.images import read_header


def read(source: Path) -> list[LabelledImage]:
    path = _annotation_file(source, YAML_SUFFIXES, "YOLO data .yaml")
    root = path.parent
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise GenfusionError(f"{path}: malformed YAML: {getattr(err, 'problem', None) or err}{at}") from err
    except UnicodeDecodeError as err:
        raise GenfusionError(
            f"{path}: malformed YAML: not UTF-8 text ({err.reason} at byte {err.start})"
        ) from err
    names = _yolo_names(data, path)
    folders = _yolo_folders(data, path, root)
    # Two splits may share a folder (tiny datasets validate on their training images).
    images = sorted({image for folder in folders for image in _files(folder, IMAGE_EXTENSIONS, root)})
    labels = {image: _inside(_yolo_label(image), root) for image in images}
    unlabelled = [image for image, label in labels.items() if not label.is_file()]
    if unlabelled:
        raise _no_label_error(unlabelled, f"add an empty {labels[unlabelled[0]]}")
    _check_no_orphan_labels(folders, set(labels.values()), root)
    return [_read_yolo_label(label, image, names) for image, label in labels.items()]


def _yolo_names(data: Any, path: Path) -> list[str]:
    names = _get(data, "names", str(path))
    if isinstance(names, list):
        return [str(name) for name in names]
    if (
        isinstance(names, dict)
        and all(isinstance(k, int) for k in names)
        and sorted(names) == list(range(len(names)))
    ):
        return [str(names[k]) for k in range(len(names))]
    raise GenfusionError(
        f"{path}: 'names' must be a list of class names or a mapping of ids 0..N-1 to names, got {names!r}"
    )


def _yolo_folders(data: dict, path: Path, root: Path) -> list[Path]:
    """The image folders the data yaml names, relative to its `path` (itself relative to the yaml);
    each must lie inside `root`."""
    base = path.parent / str(data.get("path") or "")
    folders = []
    for split in ("train", "val", "test"):
        entries = data.get(split)
        for entry in entries if isinstance(entries, list) else [entries] if entries else []:
            folder = _inside(base / str(entry), root, f"{path}: {split}")
            if not folder.is_dir():
                raise GenfusionError(
                    f"{path}: {split} folder {folder} does not exist or is not a folder"
                    " (image list .txt files are not supported)"
                )
            folders.append(folder)
    if not folders:
        raise GenfusionError(f"{path}: names none of 'train', 'val', 'test' (the image folders)")
    return folders


def _images_to_labels(folder: Path) -> Path:
    """Ultralytics' rule: the last `images` folder in the path becomes `labels`."""
    parts = list(folder.parts)
    if "images" in parts:
        parts[len(parts) - 1 - parts[::-1].index("images")] = "labels"
    return Path(*parts)


def _yolo_label(image: Path) -> Path:
    return _images_to_labels(image.parent) / f"{image.stem}.txt"


def _check_no_orphan_labels(folders: Sequence[Path], expected: set[Path], root: Path) -> None:
    for folder in folders:
        labels = _images_to_labels(folder)
        if not labels.is_dir():
            continue
        for label in _files(labels, (".txt",), root):
            # classes.txt is the class list LabelImg writes beside its labels.
            if label not in expected and label.name != "classes.txt":
                image = folder / label.parent.relative_to(labels) / label.stem
                raise GenfusionError(f"{label}: label file without its image: looked for {image}{ANY_IMAGE}")


def _read_yolo_label(label: Path, image: Path, names: list[str]) -> LabelledImage:
    # YOLO coordinates are fractions of the displayed (EXIF-rotated) image, as Ultralytics reads them.
    size = read_header(image).size
    return LabelledImage(image, tuple(read_label_file(label, names, size)), size, label)


def yolo_line(box: Box, class_id: int, width: int, height: int, task: str = "detect") -> str:
    """`class cx cy w h`, or for the segment task `class x1 y1 x2 y2 ...` (the outline), normalised
    to the image size (Ultralytics' txt formats; its detector reads boxes off outlines too)."""
    if task == "segment":
        if not box.polygon:
            raise ValueError(f"a {box.label!r} object has a box but no outline")
        points = " ".join(f"{x / width:.6f} {y / height:.6f}" for x, y in box.polygon)
        return f"{class_id} {points}"
    cx = (box.x0 + box.x1) / 2 / width
    cy = (box.y0 + box.y1) / 2 / height
    return f"{class_id} {cx:.6f} {cy:.6f} {box.width / width:.6f} {box.height / height:.6f}"


def parse_yolo_line(line: str, names: Sequence[str], width: int, height: int) -> Box:
    """Inverse of `yolo_line` (boxes and outlines); raises ValueError on a malformed line, class id
    or coordinate (nan and inf included)."""
    parts = line.split()
    if len(parts) != 5 and (len(parts) < 7 or len(parts) % 2 == 0):
        raise ValueError(
            f"expected class cx cy w h (5 numbers) or class x1 y1 x2 y2 x3 y3 ... (an outline of"
            f" at least 3 points), got {len(parts)} numbers: {line!r}"
        )
    try:
        class_id = int(parts[0])
    except ValueError:
        raise ValueError(f"class id {parts[0]!r} is not a whole number") from None
    if not 0 <= class_id < len(names):
        raise ValueError(f"class id {class_id} is not in 0..{len(names) - 1}")
    values = [_finite(p) for p in parts[1:]]
    if len(parts) > 5:
        return polygon_box(
            names[class_id], [(x * width, y * height) for x, y in zip(values[::2], values[1::2], strict=True)]
        )
    cx, cy, w, h = values
    return Box(
        names[class_id],
        (cx - w / 2) * width,
        (cy - h / 2) * height,
        (cx + w / 2) * width,
        (cy + h / 2) * height,
    )


def read_label_file(label: Path, names: Sequence[str], size: tuple[int, int]) -> list[Box]:
    """The objects of one YOLO label file of an image of `size` (width, height); a bad line is an
    error naming the file and the line."""
    boxes = []
    for number, line in enumerate(label.read_text(encoding="utf-8").splitlines(), 1):
        if not line.split():
            continue
        try:
            boxes.append(parse_yolo_line(line, names, *size))
        except ValueError as err:
            raise GenfusionError(f"{label}: line {number}: bad YOLO line {line.strip()!r}: {err}") from err
    return boxes


def label_text(boxes: Sequence[Box], names: Sequence[str], size: tuple[int, int], task: str) -> str:
    """A YOLO label file's text: one `yolo_line` per box, in order."""
    return "".join(yolo_line(box, names.index(box.label), *size, task) + "\n" for box in boxes)
