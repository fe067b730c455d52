"""`seeds` stage: real seed images in, a tiled and split YOLO dataset out.

Reads any supported annotation format, maps source classes to project classes,
normalises pixels (8-bit RGB, EXIF orientation applied), clips boxes to the image,
tiles large scenes, splits train / val / test (by scene by default, so neighbouring
tiles never straddle train and test) and writes `data/real/` plus an import report.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from PIL import Image

from genfusion import fsio, layout
from genfusion.boxes import Box, LabelledImage
from genfusion.errors import GenfusionError
from genfusion.formats.yolo import yolo_line
from genfusion.params import SPLITS, Params, SeedsParams
from genfusion.progress import progress_bar
from genfusion.scene_images import SceneImage, open_scene, pillow_limit_lifted
from genfusion.scenes import Scene, check_scene, write_scene_set
from genfusion.tiling import Window, assign_splits, tile_boxes

log = logging.getLogger(__name__)


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


def plan_tiles(scenes: Sequence[Scene], params: SeedsParams, counts: Counter) -> list[Tile]:
    tiles = []
    for scene in scenes:
        for window, cut in tile_boxes(
            scene.boxes, scene.size, params.tile_size, params.tile_overlap, params.min_visibility,
            params.min_box_size,
        ):  # fmt: skip
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
    held_out = params.test_scene
    if held_out is not None:
        if held_out not in sizes:
            raise GenfusionError(
                f"seeds.test_scene: no scene named {held_out!r} in {params.source}; the scenes are"
                f" {sorted(sizes)}"
            )
        # The held-out scene is the test split; train and val share the others as split says.
        sizes.pop(held_out)
        fractions = {"train": fractions["train"], "val": fractions["val"]}
    assignment = assign_splits(sizes, fractions, params.split_seed)
    if held_out is not None:
        assignment[held_out] = "test"
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


def import_generation(folder: Path) -> str:
    """What identifies one import: a digest of every tile, label and the manifest written."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def dataset_yaml(classes: Sequence[str], generation: str) -> str:
    body = {s: f"images/{s}" for s in SPLITS} | {"names": dict(enumerate(classes))}
    # Which import these tiles are: the test scenes written with them carry the same.
    body[layout.GENERATION] = generation
    return "# YOLO dataset written by `genfusion seeds`; paths are relative to this file.\n" + yaml.safe_dump(
        body, sort_keys=False
    )


def scene_tiles(
    by_scene: dict[Path, list[tuple[str, Tile]]], max_pixels: int | None, counts: Counter
) -> Iterator[tuple[SceneImage, str, Tile]]:
    """Each tile with its split and its scene, open while its tiles are read (one scene at a time:
    an orthomosaic is thousands of tiles, which the progress bar counts)."""
    for source, split_tiles_ in by_scene.items():
        scene = open_scene(source, max_pixels)
        for kind in scene.conversions:
            counts[f"converted_{kind}"] += 1
        try:
            for split, tile in split_tiles_:
                yield scene, split, tile
        finally:
            scene.close()


def write_real_dataset(
    out: Path,
    splits: dict[str, list[Tile]],
    classes: Sequence[str],
    counts: Counter,
    task: str = "detect",
    max_pixels: int | None = None,
) -> None:
    """Write images, labels, manifest and dataset yaml; `out` appears only when complete. Each
    scene is read a tile window at a time where its format allows (`scene_images`)."""
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
        total = sum(len(tiles) for tiles in by_scene.values())
        for scene, split, tile in progress_bar(
            scene_tiles(by_scene, max_pixels, counts), "seeds: tiling", total=total
        ):
            w = tile.window
            Image.fromarray(scene.read(w)).save(layout.images_dir(tmp, split) / f"{tile.name}.png")
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
        generation = import_generation(tmp)
        (tmp / layout.DATASET_YAML).write_text(dataset_yaml(classes, generation))
    return generation


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


def split_scenes(splits: dict[str, list[Tile]], split: str, out: Path) -> list[Scene]:
    """One split (test or val) as whole scenes: a scene all of whose tiles are in the split is
    scored whole; a tile split alone (seeds.split_by: tile) is a scene of its own, read from `out`."""
    tiles_of: dict[str, list[Tile]] = {}
    for name in SPLITS:
        for tile in splits[name]:
            tiles_of.setdefault(tile.scene.name, []).append(tile)
    # By identity: comparing tiles compares their scenes' boxes, and `in` a list is a scan.
    in_split = {id(tile) for tile in splits[split]}
    whole = {name for name, tiles in tiles_of.items() if all(id(t) in in_split for t in tiles)}
    scenes = {tile.scene.name: tile.scene for tile in splits[split] if tile.scene.name in whole}
    alone = [
        Scene(
            tile.name,
            layout.images_dir(out, split) / f"{tile.name}.png",
            (tile.window.width, tile.window.height),
            tile.boxes,
        )
        for tile in splits[split]
        if tile.scene.name not in whole
    ]
    return sorted([*scenes.values(), *alone], key=lambda scene: scene.name)


def run_seeds(
    items: Sequence[LabelledImage],
    params: SeedsParams,
    classes: Sequence[str],
    out: Path,
    task: str = "detect",
    *,
    scenes_out: Path | None = None,
    val_scenes_out: Path | None = None,
) -> dict:
    """The stage's core: annotated images in, `out` dataset (box or outline labels, as `task`
    says) and, when given, `scenes_out` and `val_scenes_out` (the test and val splits' scenes
    whole) written, report returned."""
    counts: Counter = Counter()
    with pillow_limit_lifted():  # headers only; what is decoded whole is bounded by max_pixels
        scenes = [check_scene(item, params.class_map, params.min_box_size, counts, task) for item in items]
    check_tile_size(scenes, params.tile_size)
    tiles = plan_tiles(scenes, params, counts)
    splits = split_tiles(tiles, params)
    generation = write_real_dataset(out, splits, classes, counts, task, params.max_pixels)
    # A run stopped between the writes leaves new tiles beside old scenes: the generation they
    # all carry lets the stages that read both refuse the mix (scenes.check_same_import).
    for split, folder in (("test", scenes_out), ("val", val_scenes_out)):
        if folder is not None:
            whole = split_scenes(splits, split, out)
            write_scene_set(folder, whole, classes, f"seeds: {split} scenes", params.max_pixels, generation)
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


def main(params: Params, *, out: Path, scenes: Path, val_scenes: Path | None, report: Path) -> None:
    """Entry point: paths from dvc.yaml, everything else from params."""
    from genfusion.formats import read_annotations

    with pillow_limit_lifted():  # the readers read image headers
        items = read_annotations(params.seeds.source, params.seeds.format)
    found = run_seeds(
        items, params.seeds, params.classes, out, params.task, scenes_out=scenes, val_scenes_out=val_scenes
    )
    fsio.write_json(report, found)
