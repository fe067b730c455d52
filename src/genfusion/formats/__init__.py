"""Seed annotations in Pascal VOC, COCO, YOLO or Label Studio form, read as `LabelledImage`s.

Objects are boxes, or outlines where the format has them (COCO segmentation polygons, Label
Studio polygons, YOLO segment lines), for the segment task.

Boxes are kept exactly as the files say (floats, the files' own class names, no
clipping, nothing dropped): the seeds stage clips, drops and counts. Every problem
is a `GenfusionError` naming the file (and the task or line) and what is wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from genfusion.boxes import LabelledImage
from genfusion.errors import GenfusionError
from genfusion.formats import coco, label_studio, voc, yolo
from genfusion.formats._common import YAML_SUFFIXES, _files, _inside, _single_file

FORMATS = ("voc", "coco", "yolo", "label_studio")
_READERS: dict[str, Callable[[Path], list[LabelledImage]]] = {
    "voc": voc.read,
    "coco": coco.read,
    "yolo": yolo.read,
    "label_studio": label_studio.read,
}


def detect_format(source: Path) -> str:
    """Which of FORMATS `source` holds, from file names and a JSON file's first character."""
    source = Path(source)
    if source.is_file():
        if source.suffix.lower() == ".json":
            return _json_kind(_inside(source, source.parent))
        if source.suffix.lower() in YAML_SUFFIXES:
            return "yolo"
        raise GenfusionError(
            f"{source}: cannot tell the annotation format: expected a folder, a .json"
            " (COCO or Label Studio) or a YOLO data .yaml"
        )
    if not source.is_dir():
        raise GenfusionError(f"{source}: no such file or folder")
    found = [
        ("a .json (COCO or Label Studio)", _files(source, (".json",), source, recursive=False)),
        ("a data .yaml (YOLO)", _files(source, YAML_SUFFIXES, source, recursive=False)),
        (".xml files (Pascal VOC)", _files(source, (".xml",), source)),
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
    if suffix in YAML_SUFFIXES:
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
