"""`composite` stage: copy-paste images whose labels are known by construction.

Every object of the real train tiles at least `composite.min_size` px on each side is cut out:
its box, or its outline for `task: segment`. Composite j of the s-th real train tile (in
file-name order) takes that tile as background, with its own labels, and pastes objects drawn
uniformly from all the cut-outs, with seed `composite.seed + s * per_image + j`:

- how many: `composite.density` times the box count of a real train tile drawn at random
  (at least one);
- how large: the cut-out's own size (the cut-outs are the real boxes, so sizes follow theirs,
  with no blur from enlarging a small cut-out to a large box's size) times a factor drawn from
  `composite.scale`;
- where: the centre of a real box drawn at random (as a fraction of its tile), moved by up to
  half the object's size, and kept inside the background;
- how: a quarter turn and a mirror flip (boxes stay exact, unlike other angles), brightness,
  contrast and saturation each times a factor within 1 +- `composite.colour_jitter`;
- blended with a Gaussian-feathered edge, or by Poisson (gradient-domain) cloning.

Every pasted object covers what lies under it. An object (of the background or pasted before)
of which more than `composite.max_occlusion` of the box is hidden by later objects is removed
from the labels; a partly hidden box shrinks to the bounds of its visible pixels (an outline is
kept as it is). The manifest names the background, the seed and the source of every pasted
object (`<tile stem>#<line>`: the line of the tile's label file). Same incremental, resumable
writing as `generate`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

import genfusion.placement
from genfusion.boxes import Box, polygon_box
from genfusion.formats.yolo import label_text
from genfusion.jobs import ImageJob, run_jobs
from genfusion.placement import (
    Footprint,
    Instance,
    Placement,
    Tile,
    box_statistics,
    cut_instances,
    load_tiles,
    plan,
    settle_occlusion,
)

if TYPE_CHECKING:
    from accelerate import PartialState
    from PIL import Image

    from genfusion.params import CompositeParams, Params

COMPOSITE_COLUMNS = (
    "file",
    "label",
    "background",
    "background_sha256",
    "seed",
    "objects",
    "sources_sha256",
    "settings",
    "code_sha256",
)


def transform_polygon(
    polygon: Sequence[tuple[float, float]], cut_size: tuple[int, int], placement: Placement
) -> tuple[tuple[float, float], ...]:
    """The outline of a cut-out of `cut_size` (width, height) where `placement` puts it: the
    same turns, mirror and scaling as its pixels (np.rot90 turns counter-clockwise)."""
    width, height = cut_size
    points = np.array(polygon, dtype=np.float64).reshape(-1, 2)
    for _ in range(placement.turns):
        points = np.stack([points[:, 1], width - points[:, 0]], axis=1)
        width, height = height, width
    if placement.mirror:
        points[:, 0] = width - points[:, 0]
    points *= (placement.width / width, placement.height / height)
    points += (placement.x, placement.y)
    return tuple((float(x), float(y)) for x, y in points)


def adjust_colour(pixels: np.ndarray, colour: tuple[float, float, float]) -> np.ndarray:
    """Brightness, contrast (about the mean grey) and saturation (about each pixel's grey)."""
    brightness, contrast, saturation = colour
    values = pixels.astype(np.float32) * brightness
    grey = values @ np.array([0.299, 0.587, 0.114], np.float32)
    values = (values - grey.mean()) * contrast + grey.mean()
    grey = (grey - grey.mean()) * contrast + grey.mean()
    values = grey[..., None] + (values - grey[..., None]) * saturation
    return np.clip(values, 0, 255)


def paste_object(
    canvas: np.ndarray, instance: Instance, placement: Placement, settings: CompositeParams
) -> tuple[np.ndarray, Box]:
    """Blend one cut-out into `canvas` (float32, in place); returns its mask in the canvas's
    window (y, x, h, w of the placement) and its label."""
    import cv2

    pixels, mask = np.rot90(instance.pixels, placement.turns), np.rot90(instance.mask, placement.turns)
    if placement.mirror:
        pixels, mask = pixels[:, ::-1], mask[:, ::-1]
    size = (placement.width, placement.height)
    shrinking = placement.width * placement.height < pixels.shape[0] * pixels.shape[1]
    pixels = cv2.resize(
        np.ascontiguousarray(pixels), size, interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    )
    pixels = adjust_colour(pixels, placement.colour)
    x, y, w, h = placement.x, placement.y, placement.width, placement.height
    if instance.polygon:
        polygon = transform_polygon(
            instance.polygon, (instance.mask.shape[1], instance.mask.shape[0]), placement
        )
        mask = np.zeros((h, w), np.uint8)
        cv2.fillPoly(mask, [np.round(np.array(polygon) - (x, y)).astype(np.int32)], 1)
        label = polygon_box(instance.label, polygon)
    else:
        mask = np.ones((h, w), np.uint8)
        label = Box(instance.label, x, y, x + w, y + h)
    window = canvas[y : y + h, x : x + w]
    if settings.blend == "poisson":
        window[:] = poisson_clone(pixels, window, mask)
    else:
        alpha = feathered(mask, settings.feather)[..., None]
        window[:] = alpha * pixels + (1 - alpha) * window
    return mask, label


def feathered(mask: np.ndarray, sigma: float) -> np.ndarray:
    """The mask with a soft edge: Gaussian-blurred with the outside taken as 0 (sigma in px)."""
    import cv2

    if sigma <= 0:
        return mask.astype(np.float32)
    pad = int(np.ceil(3 * sigma))
    padded = cv2.copyMakeBorder(mask.astype(np.float32), pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
    return cv2.GaussianBlur(padded, (0, 0), sigma)[pad:-pad, pad:-pad]


def poisson_clone(pixels: np.ndarray, window: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """OpenCV's seamless cloning of the masked cut-out into the window. The window is framed by
    a reflected border first: OpenCV needs the mask's region strictly inside its destination."""
    import cv2

    pad = 2
    destination = cv2.copyMakeBorder(
        np.clip(window, 0, 255).astype(np.uint8), pad, pad, pad, pad, cv2.BORDER_REFLECT
    )
    source = cv2.copyMakeBorder(pixels.astype(np.uint8), pad, pad, pad, pad, cv2.BORDER_REFLECT)
    inner = cv2.copyMakeBorder(mask * 255, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
    height, width = destination.shape[:2]
    cloned = cv2.seamlessClone(source, destination, inner, (width // 2, height // 2), cv2.NORMAL_CLONE)
    return cloned[pad:-pad, pad:-pad].astype(np.float32)


def render_composite(
    background: Tile,
    instances: Sequence[Instance],
    placements: Sequence[Placement],
    settings: CompositeParams,
) -> tuple[np.ndarray, list[Box]]:
    """The composite's pixels (uint8) and its labels: the background's objects, then the pasted
    ones in paste order, those hidden too much left out."""
    canvas = background.pixels.astype(np.float32)
    order = np.zeros(canvas.shape[:2], np.int32)
    boxes: list[Box] = list(background.boxes)
    footprints: list[Footprint | None] = [None] * len(boxes)
    for placement in placements:
        mask, label = paste_object(canvas, instances[placement.instance], placement, settings)
        boxes.append(label)
        window = order[
            placement.y : placement.y + placement.height, placement.x : placement.x + placement.width
        ]
        window[mask.astype(bool)] = len(boxes)
        footprints.append(Footprint(placement.x, placement.y, mask))
    labels = settle_occlusion(boxes, footprints, order, settings.max_occlusion)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), labels


def make_composites(
    tiles: Sequence[Tile],
    names: Sequence[str],
    settings: CompositeParams,
    out_dir: Path,
    *,
    task: str = "detect",
    state: PartialState | None = None,
) -> list[dict[str, str]]:
    """Write `settings.per_image` composites on each tile into `out_dir/images|labels/`."""
    from PIL import Image

    statistics = box_statistics(tiles)
    instances = cut_instances(tiles, settings, task)
    # Any composite may paste from any tile: a changed tile or label remakes them all.
    library = hashlib.sha256()
    for tile in tiles:
        library.update(f"{tile.stem} {tile.sha256} ".encode())
        library.update(json.dumps([label_text(tile.boxes, names, tile.size, task)]).encode())
    # The pixels and labels are the work of this module and of the placement plan: an edit to
    # either (a fix) makes them all again.
    code = hashlib.sha256(
        Path(__file__).read_bytes() + Path(genfusion.placement.__file__).read_bytes()
    ).hexdigest()
    described = json.dumps(
        settings.model_dump(mode="json", exclude={"batch"}) | {"task": task}, sort_keys=True
    )
    by_file: dict[str, tuple[Tile, list[Placement]]] = {}
    jobs = []
    for s, tile in enumerate(tiles):
        for j in range(settings.per_image):
            name = f"{tile.stem}_c{j}"
            seed = settings.seed + s * settings.per_image + j
            placements = plan(
                np.random.default_rng(seed), tile, instances, statistics, settings,
                flip=settings.flip, colour_jitter=settings.colour_jitter,
            )  # fmt: skip
            row = {
                "file": f"images/{name}.png",
                "label": f"labels/{name}.txt",
                "background": str(tile.path),
                "background_sha256": tile.sha256,
                "seed": str(seed),
                "objects": " ".join(instances[p.instance].source for p in placements),
                "sources_sha256": library.hexdigest(),
                "settings": described,
                "code_sha256": code,
            }
            by_file[row["file"]] = (tile, placements)
            jobs.append(ImageJob(row["file"], row, seed, "", tile.path, extras=(row["label"],)))

    def render(chunk: list[ImageJob]) -> list[tuple[Image.Image, dict[str, bytes]]]:
        made = []
        for job in chunk:
            tile, placements = by_file[job.file]
            pixels, labels = render_composite(tile, instances, placements, settings)
            text = label_text(labels, names, tile.size, task)
            made.append((Image.fromarray(pixels), {job.row["label"]: text.encode()}))
        return made

    return run_jobs(
        out_dir,
        jobs,
        COMPOSITE_COLUMNS,
        render,
        settings.batch,
        "composite",
        subdirs=("images", "labels"),
        state=state,
    )


def main(params: Params, *, real: Path, out: Path) -> None:
    """Entry point: paths from dvc.yaml, everything else from params (composite.*, classes, task)."""
    make_composites(load_tiles(real, params.classes), params.classes, params.composite, out, task=params.task)
