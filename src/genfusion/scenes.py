"""Whole scenes with their boxes: checking imported images, and the scene sets detectors are scored on.

A scene set (`data/scenes/<name>/`) holds every scene of one test set whole, so that an object
is counted once however the scene was tiled for training: `images/<scene>.png` (8-bit RGB) and
`annotations.json`, the boxes as COCO ground truth in scene pixels (category id = project class
index + 1). The seeds stage writes the held-out test split as `data/scenes/test`; the `test_set`
stage writes each of `evaluate.extra_sets`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from genfusion import fsio, layout
from genfusion.boxes import Box, LabelledImage
from genfusion.errors import GenfusionError
from genfusion.images import read_header
from genfusion.progress import progress_bar
from genfusion.scene_images import copy_scene, open_scene
from genfusion.tiling import exif_box

ANNOTATIONS = "annotations.json"
IMAGES = "images"


@dataclass(frozen=True)
class Scene:
    """One source image, checked: project labels, displayed frame, boxes inside the image."""

    name: str
    image: Path
    size: tuple[int, int]
    boxes: tuple[Box, ...]


def check_scene(
    item: LabelledImage, class_map: dict[str, str], min_box_size: float, counts: Counter, task: str = "detect"
) -> Scene:
    """Validate one annotated image against its pixels (header only), the class map and the task."""
    where = item.source or item.image
    header = read_header(item.image)
    width, height = header.size
    boxes = list(item.boxes)
    if item.size and 0 not in item.size and tuple(item.size) != (width, height):
        if header.orientation != 1 and tuple(item.size) == header.raw_size:
            # Annotated on the stored pixels, before EXIF rotation: turn the boxes too.
            boxes = [exif_box(b, *header.raw_size, header.orientation) for b in boxes]
            counts["exif_rotated_boxes"] += len(boxes)
        else:
            raise GenfusionError(
                f"{where}: declares image size {item.size[0]}x{item.size[1]} but {item.image}"
                f" is {width}x{height}; the boxes would not line up"
            )
    kept = []
    for box in boxes:
        if box.label not in class_map:
            known = ", ".join(sorted(class_map)) or "(none)"
            raise GenfusionError(
                f"{where}: class {box.label!r} is not in seeds.class_map (known: {known});"
                " map it to a project class in params.yaml"
            )
        if task == "segment" and not box.polygon:
            raise GenfusionError(
                f"{where}: a {box.label!r} object in {item.image.name} has a box but no outline;"
                " task: segment needs every object's outline (COCO segmentation polygons, Label"
                " Studio polygons or YOLO segment lines)"
            )
        counts["read"] += 1
        inside = box.clip(0, 0, width, height)
        if box.area == 0 or inside.area == 0:
            counts["dropped_zero_area"] += 1
            continue
        if inside != box:
            counts["clipped_to_image"] += 1
        if min(inside.width, inside.height) < min_box_size:
            counts["dropped_small"] += 1
            continue
        kept.append(replace(inside, label=class_map[box.label]))
    return Scene(item.image.stem, item.image, (width, height), tuple(kept))


def coco_ground_truth(scenes: Sequence[Scene], file_names: Sequence[str], classes: Sequence[str]) -> dict:
    """The scenes' boxes as a COCO dataset: image ids in scene order from 1, boxes [x, y, w, h]."""
    images, annotations = [], []
    for image_id, (scene, file_name) in enumerate(zip(scenes, file_names, strict=True), start=1):
        images.append(
            {
                "id": image_id,
                "file_name": file_name,
                "width": scene.size[0],
                "height": scene.size[1],
            }
        )
        for box in scene.boxes:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": classes.index(box.label) + 1,
                    "bbox": [box.x0, box.y0, box.width, box.height],
                    "area": box.area,
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(classes)]
    return {"images": images, "annotations": annotations, "categories": categories}


def write_scene_set(
    out: Path,
    scenes: Sequence[Scene],
    classes: Sequence[str],
    what: str,
    max_pixels: int,
    generation: str | None = None,
) -> None:
    """Write the scenes whole as 8-bit RGB (`scene_images.copy_scene`: PNG, or a tiled GeoTIFF
    for a scene read window by window) with their COCO ground truth; `out` appears only when
    complete. `generation` names the import of the real tiles written with it (the seeds stage's
    test scenes), kept in the ground truth's COCO `info`."""
    names = Counter(scene.name for scene in scenes)
    clashes = sorted(name for name, count in names.items() if count > 1)
    if clashes:
        raise GenfusionError(
            f"{what}: several images are named {clashes[0]!r} (in different folders); a scene set"
            " needs one image per name"
        )
    with fsio.replace_dir(out) as tmp:
        (tmp / IMAGES).mkdir()
        file_names = []
        for scene in progress_bar(scenes, f"{what}: writing scenes", total=len(scenes)):
            reader = open_scene(scene.image, max_pixels)
            try:
                copy = copy_scene(reader, tmp / IMAGES / scene.name)
            finally:
                reader.close()
            file_names.append(copy.relative_to(tmp).as_posix())
        ground_truth = coco_ground_truth(scenes, file_names, classes)
        if generation is not None:
            ground_truth = {"info": {layout.GENERATION: generation}} | ground_truth
        (tmp / ANNOTATIONS).write_text(json.dumps(ground_truth, indent=1) + "\n")


@dataclass(frozen=True)
class SceneSet:
    folder: Path
    ground_truth: dict  # COCO dataset

    def image(self, entry: dict) -> Path:
        return self.folder / entry["file_name"]

    @property
    def images(self) -> list[dict]:
        return self.ground_truth["images"]


def check_same_import(scene_set: SceneSet, real: Path) -> None:
    """The seeds stage's test scenes and the real tiles come from one import: a run stopped
    between writing the two leaves new tiles (and detectors trained on them) beside old scenes."""
    scenes = scene_set.ground_truth.get("info", {}).get(layout.GENERATION)
    tiles = layout.dataset_generation(real)
    if scenes and tiles and scenes != tiles:
        raise GenfusionError(
            f"{scene_set.folder} and {real} come from different runs of the seeds stage (imports"
            f" {scenes} and {tiles}), as when a run is stopped between writing them; run `dvc repro seeds`"
        )


def read_scene_set(folder: Path) -> SceneSet:
    path = Path(folder) / ANNOTATIONS
    try:
        ground_truth = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise GenfusionError(
            f"{path}: missing; the scene set is written by the seeds or test_set stage"
        ) from exc
    except json.JSONDecodeError as exc:
        raise GenfusionError(f"{path}: not valid JSON ({exc})") from exc
    return SceneSet(Path(folder), ground_truth)
