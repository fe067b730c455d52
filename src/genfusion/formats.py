"""Seed annotations in Pascal VOC, COCO, YOLO or Label Studio form, read as `LabelledImage`s.

Objects are boxes, or outlines where the format has them (COCO segmentation polygons, Label
Studio polygons, YOLO segment lines), for the segment task.

Boxes are kept exactly as the files say (floats, the files' own class names, no
clipping, nothing dropped): the seeds stage clips, drops and counts. Every problem
is a `GenfusionError` naming the file (and the task or line) and what is wrong.
"""

from __future__ import annotations

import json
import math
import re
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

from genfusion.annotations import Box, LabelledImage, parse_yolo_line, polygon_box
from genfusion.errors import GenfusionError
from genfusion.images import read_header

FORMATS = ("voc", "coco", "yolo", "label_studio")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
_ANY_IMAGE = f".* ({' '.join(IMAGE_EXTENSIONS)})"  # how error messages say "any image extension"
_YAML_SUFFIXES = (".yaml", ".yml")
# Label Studio prefixes uploaded file names with 8 hex digits and a dash.
_UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-")
_LOCAL_FILES = "/data/local-files"
_UPLOAD = "/data/upload/"


def detect_format(source: Path) -> str:
    """Which of FORMATS `source` holds, from file names and a JSON file's first character."""
    source = Path(source)
    if source.is_file():
        if source.suffix.lower() == ".json":
            return _json_kind(source)
        if source.suffix.lower() in _YAML_SUFFIXES:
            return "yolo"
        raise GenfusionError(
            f"{source}: cannot tell the annotation format: expected a folder, a .json"
            " (COCO or Label Studio) or a YOLO data .yaml"
        )
    if not source.is_dir():
        raise GenfusionError(f"{source}: no such file or folder")
    found = [
        ("a .json (COCO or Label Studio)", _files(source, (".json",), recursive=False)),
        ("a data .yaml (YOLO)", _files(source, _YAML_SUFFIXES, recursive=False)),
        (".xml files (Pascal VOC)", _files(source, (".xml",))),
    ]
    present = [(what, files) for what, files in found if files]
    if not present:
        raise GenfusionError(
            f"{source}: no annotations found: looked for a .json (COCO or Label Studio) or a"
            " data .yaml (YOLO) in the folder and for .xml files (Pascal VOC) anywhere below it"
        )
    if len(present) > 1:
        raise GenfusionError(
            f"{source}: cannot tell the annotation format: found {' and '.join(w for w, _ in present)};"
            " name the format explicitly (seeds.format)"
        )
    suffix = present[0][1][0].suffix.lower()
    if suffix == ".xml":
        return "voc"
    if suffix in _YAML_SUFFIXES:
        return "yolo"
    return _json_kind(_single_file(source, (".json",), "JSON"))


def read_annotations(source: Path, fmt: str = "auto") -> list[LabelledImage]:
    """Every annotated image `source` describes, sorted by image path."""
    source = Path(source)
    if fmt != "auto" and fmt not in FORMATS:
        raise GenfusionError(
            f"{source}: unknown annotation format {fmt!r}; expected auto or one of {', '.join(FORMATS)}"
        )
    if not source.exists():
        raise GenfusionError(f"{source}: no such file or folder")
    if fmt == "auto":
        fmt = detect_format(source)
    items = sorted(_READERS[fmt](source), key=lambda item: item.image)
    if not items:
        raise GenfusionError(f"{source}: no annotations found ({fmt}): no annotated image at all")
    if not any(item.boxes for item in items):
        raise GenfusionError(
            f"{source}: no annotations found ({fmt}): none of its {len(items)} images has a box"
        )
    _check_unique_names(items)
    return items


# --- shared helpers ---------------------------------------------------------------


def _files(folder: Path, suffixes: Sequence[str], recursive: bool = True) -> list[Path]:
    """Files under `folder` whose extension, in any case, is one of `suffixes`; sorted."""
    found = folder.rglob("*") if recursive else folder.iterdir()
    # Hidden files and folders (.ipynb_checkpoints, half-written .tmp files) hold copies, not data.
    return sorted(
        p
        for p in found
        if p.suffix.lower() in suffixes
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and p.is_file()
    )


def _single_file(folder: Path, suffixes: Sequence[str], what: str) -> Path:
    found = _files(folder, suffixes, recursive=False)
    if len(found) != 1:
        listing = ", ".join(p.name for p in found) or "none"
        raise GenfusionError(
            f"{folder}: expected exactly one {what} file in the folder, found {len(found)}: {listing}"
        )
    return found[0]


def _listing(paths: Sequence[Path], limit: int = 5) -> str:
    shown = ", ".join(str(p) for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def _find_image(candidates: Sequence[Path], where: str, also: str = "") -> Path:
    """The first candidate that is a file; else the "label file without its image" error."""
    for path in candidates:
        if path.is_file():
            return path
    looked = [str(p) for p in dict.fromkeys(candidates)] + ([also] if also else [])
    raise GenfusionError(f"{where}: label file without its image: looked for {' or '.join(looked)}")


def _no_label_error(images: Sequence[Path], hint: str) -> GenfusionError:
    """The reverse of "label file without its image": images that nothing annotates."""
    more = f" (nor have {_listing(images[1:])})" if len(images) > 1 else ""
    return GenfusionError(
        f"{images[0]}: image has no label file{more}; {hint} to mark an image with no objects"
    )


def _check_unique_names(items: Sequence[LabelledImage]) -> None:
    """Later stages name outputs by image stem, so no two images may share one."""
    seen: dict[str, LabelledImage] = {}
    for item in items:
        first = seen.setdefault(item.image.stem, item)
        if first is item:
            continue
        if first.image == item.image:
            where = (
                f"in {item.source}"
                if first.source == item.source
                else f"in both {first.source} and {item.source}"
            )
            raise GenfusionError(f"{item.image}: image is annotated twice, {where}")
        raise GenfusionError(
            f"duplicate image name {item.image.stem!r}: {first.image} and {item.image};"
            " later stages name outputs by image name, so rename one"
        )


def _number(value: Any, where: str) -> float:
    """`value` as a finite float; `where` names the file and field for the error."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    # bool is an int to Python, but `true` is never a coordinate.
    if isinstance(value, bool) or not math.isfinite(number):
        raise GenfusionError(f"{where} is not a number: {value!r}")
    return number


def _size(width: Any, height: Any, where: str) -> tuple[int, int] | None:
    """(width, height), or None where the file leaves it out or writes 0 (tools do, for unknown)."""
    if width is None or height is None:
        return None
    size = (round(_number(width, f"{where} width")), round(_number(height, f"{where} height")))
    return size if min(size) > 0 else None


def _get(mapping: Any, key: str, where: str) -> Any:
    """A required JSON / YAML field."""
    if not isinstance(mapping, dict):
        raise GenfusionError(f"{where} is not an object: {str(mapping)[:60]!r}")
    if mapping.get(key) is None:
        raise GenfusionError(f"{where} has no {key!r}")
    return mapping[key]


def _get_list(mapping: Any, key: str, where: str) -> list:
    value = _get(mapping, key, where)
    if not isinstance(value, list):
        raise GenfusionError(f"{where}: {key!r} is not a list")
    return value


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as err:
        raise GenfusionError(
            f"{path}: malformed JSON: {err.msg} at line {err.lineno}, column {err.colno}"
        ) from None
    except UnicodeDecodeError as err:
        raise GenfusionError(
            f"{path}: malformed JSON: not UTF-8 text ({err.reason} at byte {err.start})"
        ) from None


def _json_source(source: Path) -> Path:
    return _single_file(source, (".json",), "JSON") if source.is_dir() else source


def _json_kind(path: Path) -> str:
    """COCO is one JSON object, a Label Studio export a list of tasks: the first character tells."""
    with path.open(encoding="utf-8-sig", errors="replace") as f:
        head = f.read(4096).lstrip()
    if head.startswith("["):
        return "label_studio"
    if head.startswith("{"):
        return "coco"
    raise GenfusionError(
        f"{path}: cannot tell the annotation format: expected a JSON list of tasks (Label Studio)"
        " or a JSON object (COCO)"
    )


# --- Pascal VOC ---------------------------------------------------------------------


def _read_voc(source: Path) -> list[LabelledImage]:
    if not source.is_dir():
        raise GenfusionError(f"{source}: a Pascal VOC source must be a folder of .xml files")
    files = _files(source, (".xml", *IMAGE_EXTENSIONS))
    images = [p for p in files if p.suffix.lower() != ".xml"]
    beside: dict[tuple[Path, str], list[Path]] = defaultdict(list)
    by_name: dict[str, list[Path]] = defaultdict(list)
    for image in images:
        beside[image.parent, image.stem].append(image)
        by_name[image.name].append(image)
    items = [_read_voc_file(xml, beside, by_name) for xml in files if xml.suffix.lower() == ".xml"]
    unlabelled = sorted(set(images) - {item.image for item in items})
    if unlabelled:
        raise _no_label_error(unlabelled, "add a .xml holding an <annotation> with no <object>")
    return items


def _read_voc_file(
    xml: Path, beside: dict[tuple[Path, str], list[Path]], by_name: dict[str, list[Path]]
) -> LabelledImage:
    try:
        root = ET.parse(xml).getroot()
    except ET.ParseError as err:
        raise GenfusionError(f"{xml}: malformed XML: {err}") from None
    if root.tag != "annotation":
        raise GenfusionError(
            f"{xml}: not a Pascal VOC annotation: the root element is <{root.tag}>, not <annotation>"
        )
    named = PurePosixPath((root.findtext("filename") or "").strip().replace("\\", "/")).name
    candidates = [xml.parent / named] if named else []
    # Tools keep the original <filename> (a .tif) after the image was converted (to a .png):
    # then the image named like the xml beside it is the one; the VOC devkit layout keeps
    # images in a sibling folder, so a single image of that name anywhere below also counts.
    candidates += beside.get((xml.parent, xml.stem), [])
    candidates += by_name[named] if named and len(by_name[named]) == 1 else []
    image = _find_image(candidates, str(xml), also=f"an image {xml.parent / xml.stem}{_ANY_IMAGE}")
    size_element = root.find("size")
    size = None
    if size_element is not None:
        size = _size(size_element.findtext("width"), size_element.findtext("height"), f"{xml}: <size>")
    boxes = []
    for index, obj in enumerate(root.findall("object"), 1):
        where = f"{xml}: object {index}"
        label = _xml_text(obj, "name", where)
        bndbox = _xml_child(obj, "bndbox", where)
        x0, y0, x1, y1 = (
            _number(_xml_text(bndbox, tag, where), f"{where}: <{tag}>")
            for tag in ("xmin", "ymin", "xmax", "ymax")
        )
        boxes.append(Box(label, x0, y0, x1, y1))
    return LabelledImage(image, tuple(boxes), size, xml)


def _xml_child(element: ET.Element, tag: str, where: str) -> ET.Element:
    child = element.find(tag)
    if child is None:
        raise GenfusionError(f"{where}: <{element.tag}> has no <{tag}>")
    return child


def _xml_text(element: ET.Element, tag: str, where: str) -> str:
    text = (_xml_child(element, tag, where).text or "").strip()
    if not text:
        raise GenfusionError(f"{where}: <{tag}> is empty")
    return text


# --- COCO ---------------------------------------------------------------------------


def _read_coco(source: Path) -> list[LabelledImage]:
    path = _json_source(source)
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
        image = _find_image([path.parent / name, path.parent / "images" / name], where)
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


# --- YOLO ---------------------------------------------------------------------------


def _read_yolo(source: Path) -> list[LabelledImage]:
    path = _single_file(source, _YAML_SUFFIXES, "YOLO data .yaml") if source.is_dir() else source
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise GenfusionError(f"{path}: malformed YAML: {getattr(err, 'problem', None) or err}{at}") from None
    except UnicodeDecodeError as err:
        raise GenfusionError(
            f"{path}: malformed YAML: not UTF-8 text ({err.reason} at byte {err.start})"
        ) from None
    names = _yolo_names(data, path)
    folders = _yolo_folders(data, path)
    # Two splits may share a folder (tiny datasets validate on their training images).
    images = sorted({image for folder in folders for image in _files(folder, IMAGE_EXTENSIONS)})
    unlabelled = [image for image in images if not _yolo_label(image).is_file()]
    if unlabelled:
        raise _no_label_error(unlabelled, f"add an empty {_yolo_label(unlabelled[0])}")
    _check_no_orphan_labels(folders, {_yolo_label(image) for image in images})
    return [_read_yolo_label(_yolo_label(image), image, names) for image in images]


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


def _yolo_folders(data: dict, path: Path) -> list[Path]:
    """The image folders the data yaml names, relative to its `path` (itself relative to the yaml)."""
    root = path.parent / str(data.get("path") or "")
    folders = []
    for split in ("train", "val", "test"):
        entries = data.get(split)
        for entry in entries if isinstance(entries, list) else [entries] if entries else []:
            folder = root / str(entry)
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


def _check_no_orphan_labels(folders: Sequence[Path], expected: set[Path]) -> None:
    for folder in folders:
        labels = _images_to_labels(folder)
        if not labels.is_dir():
            continue
        for label in _files(labels, (".txt",)):
            # classes.txt is the class list LabelImg writes beside its labels.
            if label not in expected and label.name != "classes.txt":
                image = folder / label.parent.relative_to(labels) / label.stem
                raise GenfusionError(f"{label}: label file without its image: looked for {image}{_ANY_IMAGE}")


def _read_yolo_label(label: Path, image: Path, names: list[str]) -> LabelledImage:
    # YOLO coordinates are fractions of the displayed (EXIF-rotated) image, as Ultralytics reads them.
    width, height = read_header(image).size
    boxes = []
    for number, line in enumerate(label.read_text(encoding="utf-8").splitlines(), 1):
        if not line.split():
            continue
        try:
            boxes.append(parse_yolo_line(line, names, width, height))
        except ValueError as err:
            raise GenfusionError(f"{label}: line {number}: bad YOLO line {line.strip()!r}: {err}") from None
    return LabelledImage(image, tuple(boxes), (width, height), label)


# --- Label Studio -------------------------------------------------------------------


def _read_label_studio(source: Path) -> list[LabelledImage]:
    path = _json_source(source)
    tasks = _load_json(path)
    if not isinstance(tasks, list):
        raise GenfusionError(
            f"{path}: not a Label Studio JSON export: expected a list of tasks,"
            f" got a JSON {type(tasks).__name__}"
        )
    items = (
        read_label_studio_task(task, index, str(path), path.parent, path) for index, task in enumerate(tasks)
    )
    return [item for item in items if item is not None]


def read_label_studio_task(
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
    return _find_image([root / c for c in dict.fromkeys(candidates)], where)


_READERS: dict[str, Callable[[Path], list[LabelledImage]]] = {
    "voc": _read_voc,
    "coco": _read_coco,
    "yolo": _read_yolo,
    "label_studio": _read_label_studio,
}
