"""`seeds` stage: real seed images in, a tiled and split YOLO dataset out.

Reads any supported annotation format, maps source classes to project classes,
normalises pixels (8-bit RGB, EXIF orientation applied), clips boxes to the image,
tiles large scenes, splits train / val / test (by scene by default, so neighbouring
tiles never straddle train and test) and writes `data/real/` plus an import report.
"""

from __future__ import annotations

import csv
import io
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from genfusion import fsio, layout
from genfusion.boxes import Box, LabelledImage
from genfusion.errors import GenfusionError
from genfusion.formats.yolo import yolo_line
from genfusion.images import open_image, read_header, to_rgb
from genfusion.params import SPLITS, Params, SeedsParams
from genfusion.progress import progress_bar
from genfusion.tiling import Window, assign_splits, boxes_in_window, exif_box, tile_windows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scene:
    """One source image, checked: project labels, displayed frame, boxes inside the image."""

    name: str
    image: Path
    size: tuple[int, int]
    boxes: tuple[Box, ...]


@dataclass(frozen=True)
class Tile:
    scene: Scene
    window: Window
    boxes: tuple[Box, ...]

    @property
    def name(self) -> str:
        if self.window.width == self.scene.size[0] and self.window.height == self.scene.size[1]:
            return self.scene.name
        return f"{self.scene.name}_x{self.window.x0}_y{self.window.y0}"


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


def plan_tiles(scenes: Sequence[Scene], params: SeedsParams, counts: Counter) -> list[Tile]:
    tiles = []
    for scene in scenes:
        for window in tile_windows(*scene.size, params.tile_size, params.tile_overlap):
            cut = boxes_in_window(scene.boxes, window, params.min_visibility, params.min_box_size)
            counts["cut_by_tile_edge"] += cut.cut
            counts["dropped_by_tile_edge"] += cut.dropped
            tiles.append(Tile(scene, window, cut.boxes))
    return tiles


def check_tile_size(scenes: Sequence[Scene], tile_size: int) -> None:
    sides = [(max(b.width, b.height), s.image) for s in scenes for b in s.boxes]
    if not sides:
        return
    smallest, where = min(sides)
    if smallest > tile_size:
        raise GenfusionError(
            f"seeds.tile_size ({tile_size}) is smaller than every box (the smallest is"
            f" {smallest:.0f} px, in {where}); no box would fit in a tile"
        )
    too_big = sum(side > tile_size for side, _ in sides)
    if too_big:
        log.warning("%d boxes are larger than seeds.tile_size (%d px) and will be cut", too_big, tile_size)


def split_tiles(tiles: Sequence[Tile], params: SeedsParams) -> dict[str, list[Tile]]:
    key = (lambda t: t.scene.name) if params.split_by == "scene" else (lambda t: t.name)
    sizes = Counter(key(t) for t in tiles)
    fractions = {s: params.split[s] for s in SPLITS}
    assignment = assign_splits(sizes, fractions, params.split_seed)
    splits: dict[str, list[Tile]] = {s: [] for s in SPLITS}
    for tile in tiles:
        splits[assignment[key(tile)]].append(tile)
    empty = [s for s in SPLITS if not splits[s]]
    if empty:
        groups = "scenes" if params.split_by == "scene" else "tiles"
        raise GenfusionError(
            f"split {empty} would be empty: {len(sizes)} {groups} cannot fill train, val and test"
            f" with fractions {fractions}; add seed images, use seeds.split_by: tile, or a smaller"
            " seeds.tile_size"
        )
    return splits


def dataset_yaml(classes: Sequence[str]) -> str:
    body = {s: f"images/{s}" for s in SPLITS} | {"names": dict(enumerate(classes))}
    return "# YOLO dataset written by `genfusion seeds`; paths are relative to this file.\n" + yaml.safe_dump(
        body, sort_keys=False
    )


def write_real_dataset(
    out: Path, splits: dict[str, list[Tile]], classes: Sequence[str], counts: Counter, task: str = "detect"
) -> None:
    """Write images, labels, manifest and dataset yaml; `out` appears only when complete."""
    manifest = io.StringIO()
    rows = csv.writer(manifest, lineterminator="\n")
    rows.writerow(["image", "scene", "split", "boxes", "width", "height", "x0", "y0"])
    by_scene: dict[Path, list[tuple[str, Tile]]] = {}
    for split, tiles in splits.items():
        for tile in tiles:
            by_scene.setdefault(tile.scene.image, []).append((split, tile))
    with fsio.replace_dir(out) as tmp:
        for split in SPLITS:
            layout.images_dir(tmp, split).mkdir(parents=True)
            layout.labels_dir(tmp, split).mkdir(parents=True)
        for source, split_tiles_ in progress_bar(by_scene.items(), "seeds: tiling", total=len(by_scene)):
            with open_image(source) as raw:
                pixels, conversion = to_rgb(raw, source)
            if conversion:
                counts[f"converted_{conversion}"] += 1
            for split, tile in split_tiles_:
                w = tile.window
                pixels.crop((w.x0, w.y0, w.x1, w.y1)).save(layout.images_dir(tmp, split) / f"{tile.name}.png")
                lines = [yolo_line(b, classes.index(b.label), w.width, w.height, task) for b in tile.boxes]
                layout.label_file(tmp, tile.name, split).write_text("".join(f"{x}\n" for x in lines))
                counts["written"] += len(tile.boxes)
        for split in SPLITS:
            for tile in sorted(splits[split], key=lambda t: t.name):
                w = tile.window
                rows.writerow(
                    [
                        f"images/{split}/{tile.name}.png",
                        tile.scene.name,
                        split,
                        len(tile.boxes),
                        w.width,
                        w.height,
                        w.x0,
                        w.y0,
                    ]
                )
        (tmp / layout.MANIFEST).write_text(manifest.getvalue())
        (tmp / layout.DATASET_YAML).write_text(dataset_yaml(classes))


def import_report(scenes: Sequence[Scene], splits: dict[str, list[Tile]], counts: Counter) -> dict:
    box_keys = (
        "read",
        "clipped_to_image",
        "dropped_zero_area",
        "dropped_small",
        "written",
        "cut_by_tile_edge",
        "dropped_by_tile_edge",
        "exif_rotated_boxes",
    )
    return {
        "scenes": len(scenes),
        "tiles": {s: len(splits[s]) for s in SPLITS},
        "scenes_per_split": {s: len({t.scene.name for t in splits[s]}) for s in SPLITS},
        "boxes_per_split": {s: sum(len(t.boxes) for t in splits[s]) for s in SPLITS},
        "boxes": {k: counts[k] for k in box_keys},
        "images_converted": {
            k.removeprefix("converted_"): v for k, v in sorted(counts.items()) if k.startswith("converted_")
        },
    }


def run_seeds(
    items: Sequence[LabelledImage],
    params: SeedsParams,
    classes: Sequence[str],
    out: Path,
    task: str = "detect",
) -> dict:
    """The stage's core: annotated images in, `out` dataset written (box or outline labels, as
    `task` says), report returned."""
    counts: Counter = Counter()
    scenes = [check_scene(item, params.class_map, params.min_box_size, counts, task) for item in items]
    check_tile_size(scenes, params.tile_size)
    tiles = plan_tiles(scenes, params, counts)
    splits = split_tiles(tiles, params)
    write_real_dataset(out, splits, classes, counts, task)
    report = import_report(scenes, splits, counts)
    log.info(
        "seeds: %d scenes -> %s tiles (train/val/test), %d boxes written, %d clipped, %d dropped",
        len(scenes),
        "/".join(str(len(splits[s])) for s in SPLITS),
        counts["written"],
        counts["clipped_to_image"] + counts["cut_by_tile_edge"],
        counts["dropped_zero_area"] + counts["dropped_small"] + counts["dropped_by_tile_edge"],
    )
    return report


def main(params: Params, *, out: Path, report: Path) -> None:
    """Entry point: paths from dvc.yaml, everything else from params."""
    from genfusion.formats import read_annotations

    items = read_annotations(params.seeds.source, params.seeds.format)
    fsio.write_json(report, run_seeds(items, params.seeds, params.classes, out, params.task))
