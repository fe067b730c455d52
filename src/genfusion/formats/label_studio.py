"""Label Studio: a JSON export (a list of tasks, each with its annotations) read into boxes and
outlines, and the task JSON (image, size, predictions) written for a Label Studio project."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from genfusion.boxes import Box, LabelledImage, polygon_box
from genfusion.errors import GenfusionError
from genfusion.formats._common import _annotation_file, _find_image, _get, _get_list, _load_json, _number
from genfusion.formats.yolo import yolo_line

# Label Studio prefixes uploaded file names with 8 hex digits and a dash.
_UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-")
_LOCAL_FILES = "/data/local-files"
_UPLOAD = "/data/upload/"
# The task data field that names an image for good: "<subject>/<file name>".
KEY = "genfusion_key"
FROM_NAME, TO_NAME = "label", "image"


def read(source: Path) -> list[LabelledImage]:
    path = _annotation_file(source, (".json",), "JSON")
    tasks = _load_json(path)
    if not isinstance(tasks, list):
        raise GenfusionError(
            f"{path}: not a Label Studio JSON export: expected a list of tasks,"
            f" got a JSON {type(tasks).__name__}"
        )
    items = (read_task(task, index, str(path), path.parent, path) for index, task in enumerate(tasks))
    return [item for item in items if item is not None]


def read_task(
    task: Any, index: int, source: str, root: Path, origin: Path | None = None
) -> LabelledImage | None:
    """One exported task's latest annotation that was not cancelled (None when it has none),
    its image found under `root`; `source` names the export in messages, `origin` is recorded
    as the labels' file."""
    task_id = task.get("id", f"at index {index}") if isinstance(task, dict) else f"at index {index}"
    where = f"{source}: task {task_id}"
    annotations = _get_list(task, "annotations", where)
    kept = [a for a in annotations if isinstance(a, dict) and not a.get("was_cancelled")]
    if not kept:
        return None
    # ISO timestamps from one export sort as text; the id breaks ties and stands in when absent.
    latest = max(
        kept, key=lambda a: (str(a.get("updated_at") or ""), a["id"] if isinstance(a.get("id"), int) else -1)
    )
    image = _ls_image(str(_get(_get(task, "data", where), "image", f"{where}: data")), root, where)
    boxes, size = [], None
    for number, result in enumerate(_get_list(latest, "result", f"{where}: annotation {latest.get('id')}")):
        kind = result.get("type") if isinstance(result, dict) else None
        if kind in ("rectanglelabels", "polygonlabels"):
            read = _ls_box if kind == "rectanglelabels" else _ls_polygon
            box, box_size = read(result, f"{where}: annotation {latest.get('id')}: result {number}")
            boxes.append(box)
            size = size or box_size
    return LabelledImage(image, tuple(boxes), size, origin)


def _ls_size(result: dict, where: str) -> tuple[float, float]:
    width, height = (
        _number(_get(result, key, where), f"{where}: {key}") for key in ("original_width", "original_height")
    )
    if width <= 0 or height <= 0:
        raise GenfusionError(
            f"{where}: original_width / original_height must be positive, got {width:g} x {height:g}"
        )
    return width, height


def _ls_label(value: dict, key: str, where: str) -> str:
    labels = _get_list(value, key, f"{where}: value")
    if not labels:
        raise GenfusionError(f"{where}: value.{key} is empty")
    return str(labels[0])


def _ls_polygon(result: dict, where: str) -> tuple[Box, tuple[int, int]]:
    """A polygon result: points in percent of the image, like rectangles."""
    value = _get(result, "value", where)
    width, height = _ls_size(result, where)
    points = _get_list(value, "points", f"{where}: value")
    if len(points) < 3 or not all(isinstance(p, list) and len(p) == 2 for p in points):
        raise GenfusionError(f"{where}: value.points must be at least 3 [x, y] pairs, got {points!r}")
    at = f"{where}: value.points"
    outline = [(_number(x, at) * width / 100, _number(y, at) * height / 100) for x, y in points]
    label = _ls_label(value, "polygonlabels", where)
    return polygon_box(label, outline), (round(width), round(height))


def _ls_box(result: dict, where: str) -> tuple[Box, tuple[int, int]]:
    value = _get(result, "value", where)
    width, height = _ls_size(result, where)
    x, y, w, h = (
        _number(_get(value, key, f"{where}: value"), f"{where}: value.{key}")
        for key in ("x", "y", "width", "height")
    )
    label = _ls_label(value, "rectanglelabels", where)
    rotation = _number(value.get("rotation", 0), f"{where}: value.rotation")
    x0, y0, x1, y1 = _rotated_bounds(
        x * width / 100, y * height / 100, w * width / 100, h * height / 100, rotation
    )
    return Box(label, x0, y0, x1, y1), (round(width), round(height))


def _rotated_bounds(
    x: float, y: float, w: float, h: float, degrees: float
) -> tuple[float, float, float, float]:
    """The axis-aligned box around a w x h rectangle turned `degrees` clockwise about its corner (x, y)."""
    cos, sin = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    corners = ((0.0, 0.0), (w, 0.0), (w, h), (0.0, h))
    # With y pointing down, the usual rotation matrix turns clockwise on screen.
    xs = [x + dx * cos - dy * sin for dx, dy in corners]
    ys = [y + dx * sin + dy * cos for dx, dy in corners]
    return min(xs), min(ys), max(xs), max(ys)


def _ls_image(value: str, root: Path, where: str) -> Path:
    """The file under `root` that a task's data.image names; refuses anything that could leave `root`."""
    url = urlsplit(value)
    relative, candidates, problem = value, [value], None
    if _LOCAL_FILES in url.path and url.query:
        relative = (parse_qs(url.query).get("d") or [""])[0]
        candidates = [relative, PurePosixPath(relative).name]
    elif _UPLOAD in url.path:
        relative = unquote(url.path.split(_UPLOAD, 1)[1])
        name = PurePosixPath(relative).name
        candidates = [name, _UPLOAD_PREFIX.sub("", name)]
    elif url.scheme in ("http", "https"):
        problem = f"is a URL on another host (only {_LOCAL_FILES}/?d= and {_UPLOAD} URLs name local files)"
    elif len(url.scheme) > 1:  # a one-letter scheme is a Windows drive: an absolute path, below
        problem = f"is a {url.scheme}: URL"
    posix = PurePosixPath(relative.replace("\\", "/"))
    if problem is None and (posix.is_absolute() or re.match(r"^[A-Za-z]:", relative)):
        problem = "is an absolute path"
    if problem is None and ".." in posix.parts:
        problem = "climbs out with '..'"
    if problem:
        raise GenfusionError(
            f"{where}: image {value!r} {problem}; refusing it: only files under {root} are read"
        )
    if not posix.name:
        raise GenfusionError(f"{where}: image {value!r} names no file")
    return _find_image([root / c for c in dict.fromkeys(candidates)], where, root)


# --- writing tasks, and reading a project's export back into YOLO labels -------------------


def label_config(classes: Sequence[str], task: str) -> str:
    """The labelling interface: the image and one tool (rectangles, or polygons) with the classes."""
    tool = "PolygonLabels" if task == "segment" else "RectangleLabels"
    labels = "".join(f'<Label value="{_xml_attr(name)}"/>' for name in classes)
    return (
        f'<View><Image name="{TO_NAME}" value="${TO_NAME}"/>'
        f'<{tool} name="{FROM_NAME}" toName="{TO_NAME}">{labels}</{tool}></View>'
    )


def _xml_attr(text: str) -> str:
    return text.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;")


def ls_result(box: Box, size: tuple[int, int], task: str) -> dict:
    """One object as a Label Studio result: coordinates in percent of the image."""
    width, height = size
    common = {"from_name": FROM_NAME, "to_name": TO_NAME, "original_width": width, "original_height": height}
    if task == "segment":
        points = [[x * 100 / width, y * 100 / height] for x, y in box.polygon or box.corners]
        return common | {"type": "polygonlabels", "value": {"points": points, "polygonlabels": [box.label]}}
    value = {
        "x": box.x0 * 100 / width,
        "y": box.y0 * 100 / height,
        "width": box.width * 100 / width,
        "height": box.height * 100 / height,
        "rotation": 0,
        "rectanglelabels": [box.label],
    }
    return common | {"type": "rectanglelabels", "value": value}


@dataclass(frozen=True)
class Prediction:
    """An image's automatic labels, as the prelabel stage wrote them."""

    boxes: Sequence[Box]
    scores: Sequence[float]
    method: str


def task_json(key: str, url: str, size: tuple[int, int], task: str, prediction: Prediction | None) -> dict:
    """A task for one image, its automatic labels (when it has them) as the prediction people start from."""
    data = {"data": {TO_NAME: url, KEY: key}}
    if prediction is None:
        return data
    result = {
        "model_version": f"genfusion-{prediction.method}",
        # The weakest box's confidence: Label Studio sorts tasks by it, the least sure first.
        "score": min(prediction.scores, default=1.0),
        "result": [ls_result(box, size, task) for box in prediction.boxes],
    }
    return data | {"predictions": [result]}


@dataclass
class Pulled:
    """What an export holds for one subject: people's labels, and where each task stands."""

    labels: dict[str, str] = field(default_factory=dict)  # image stem -> YOLO label text
    rows: list[dict] = field(default_factory=list)  # manifest rows, one per finished image
    skipped: list[str] = field(default_factory=list)  # every annotation cancelled ("skip")
    open: list[str] = field(default_factory=list)  # no annotation yet


def read_export(tasks: Any, source: str, images: Path, classes: Sequence[str], task: str) -> Pulled:
    """People's labels from an exported task list; images must be files under `images`."""
    from genfusion.images import read_header

    if not isinstance(tasks, list):
        raise GenfusionError(f"{source}: the export is not a list of tasks")
    pulled = Pulled()
    for index, entry in enumerate(tasks):
        item = read_task(entry, index, source, images)
        name = str(entry.get("data", {}).get(KEY) or entry.get("id"))
        if item is None:
            cancelled = any(a.get("was_cancelled") for a in entry.get("annotations", []))
            (pulled.skipped if cancelled else pulled.open).append(name)
            continue
        where = f"{source}: task {entry.get('id')}"
        for box in item.boxes:
            if box.label not in classes:
                raise GenfusionError(
                    f"{where}: label {box.label!r} is not one of the params classes {list(classes)};"
                    " fix the annotation in Label Studio, or add the class to params.yaml"
                )
        size = read_header(item.image).size
        if item.size and tuple(item.size) != size:
            raise GenfusionError(
                f"{where}: annotated at {item.size[0]}x{item.size[1]} px but {item.image} is"
                f" {size[0]}x{size[1]}; the labels would not line up"
            )
        stem = item.image.stem
        if stem in pulled.labels:
            raise GenfusionError(f"{where}: {item.image.name} is the image of two tasks; delete one")
        lines = [yolo_line(box, classes.index(box.label), *size, task) for box in item.boxes]
        pulled.labels[stem] = "".join(f"{line}\n" for line in lines)
        latest = max(
            (a for a in entry["annotations"] if not a.get("was_cancelled")),
            key=lambda a: (str(a.get("updated_at") or ""), a.get("id") or -1),
        )
        pulled.rows.append(
            {
                "file": f"labels/{stem}.txt",
                "task": entry.get("id"),
                "annotation": latest.get("id"),
                "updated_at": latest.get("updated_at"),
                "boxes": len(lines),
            }
        )
    return pulled
