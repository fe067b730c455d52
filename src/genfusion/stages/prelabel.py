"""`prelabel@subject` stage: automatic labels for one subject's generated images.

Two methods (params `prelabel.method`):
- attention (Dataset Diffusion): the maps `generate` captured beside each image
  (`attention/<stem>.npz`) are refined by the self-attention raised to `self_exponent`,
  normalised per class, resized to the image and thresholded into a mask (0 background,
  c+1 class c, 255 ignore between `low` and `high`); each connected region of a class of at
  least `min_box_area` pixels becomes a box scored by its mean class score, with the region's
  outline through its border pixels (ignore pixels are outside every outline). Thresholds
  are applied here, so tuning them never regenerates images.
- detector: the detector trained on the real seeds labels the images above `conf` (a
  segmentation detector, for `task: segment`, gives outlines too).

Writes `labels/<stem>.txt` (YOLO boxes, or outlines for `task: segment`; empty = nothing found;
one per image), `masks/<stem>.png` (attention only) and `manifest.csv` (file, method, boxes,
scores as a JSON list in label order): the format both the datasets stage and Label Studio
pre-annotations read.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from genfusion import fsio, layout
from genfusion.boxes import Box
from genfusion.detection import Labels, detect
from genfusion.errors import GenfusionError
from genfusion.formats.yolo import yolo_line
from genfusion.layout import IGNORE, MANIFEST
from genfusion.manifest import read_manifest, write_manifest
from genfusion.params import PrelabelParams
from genfusion.progress import progress_bar

if TYPE_CHECKING:
    from genfusion.params import Params

PRELABEL_COLUMNS = ("file", "method", "boxes", "scores")


def refine(cross: np.ndarray, self_attention: np.ndarray, exponent: int) -> np.ndarray:
    """Class maps (C, S, S) refined by self-attention^exponent and min-max normalised per class."""
    classes, side, _ = cross.shape
    flat = cross.reshape(classes, side * side).astype(np.float64)
    power = np.linalg.matrix_power(self_attention.astype(np.float64), exponent)
    refined = (power @ flat.T).T.reshape(classes, side, side)
    low = refined.min(axis=(1, 2), keepdims=True)
    span = refined.max(axis=(1, 2), keepdims=True) - low
    return np.divide(refined - low, span, out=np.zeros_like(refined), where=span > 0)


def scores_to_mask(scores: np.ndarray, low: float, high: float) -> np.ndarray:
    """(C, H, W) scores in [0, 1] -> uint8 mask: 0 background, c+1 class c, 255 ignore."""
    best = scores.argmax(axis=0)
    value = scores.max(axis=0)
    mask = (best + 1).astype(np.uint8)
    mask[value < high] = IGNORE
    mask[value < low] = 0
    return mask


def mask_to_boxes(
    mask: np.ndarray, scores: np.ndarray, names: Sequence[str], min_area: int
) -> tuple[list[Box], list[float]]:
    """Each 8-connected region of a class with at least `min_area` pixels -> its bounding box and
    outline, scored by the mean class score over the region."""
    import cv2

    boxes, box_scores = [], []
    for c, name in enumerate(names):
        count, regions, stats, _ = cv2.connectedComponentsWithStats(
            (mask == c + 1).astype(np.uint8), connectivity=8
        )
        for k in range(1, count):  # 0 is everything outside the class
            x, y, w, h, area = stats[k]
            if area < min_area:
                continue
            region = regions == k
            box = Box(name, float(x), float(y), float(x + w), float(y + h))
            boxes.append(replace(box, polygon=region_outline(region, box)))
            box_scores.append(round(float(scores[c][region].mean()), 4))
    return boxes, box_scores


def region_outline(region: np.ndarray, box: Box) -> tuple[tuple[float, float], ...]:
    """The outer boundary of a connected region, through the centres of its border pixels; a
    region too thin to enclose an area is outlined by its box."""
    import cv2

    contours, _ = cv2.findContours(region.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    points = max(contours, key=len).reshape(-1, 2)
    if len(points) < 3:
        return box.corners
    # Contours run through pixel indices; pixel k spans [k, k + 1), its centre is k + 0.5.
    return tuple((float(x) + 0.5, float(y) + 0.5) for x, y in points)


def attention_labels(
    maps: dict[str, np.ndarray], size: tuple[int, int], names: Sequence[str], params: PrelabelParams
) -> Labels:
    """An image's labels from its captured maps (`cross`, `self`); size is (width, height)."""
    import cv2

    refined = refine(maps["cross"], maps["self"], params.self_exponent)
    scores = np.stack(
        [cv2.resize(m.astype(np.float32), size, interpolation=cv2.INTER_LINEAR) for m in refined]
    )
    mask = scores_to_mask(scores, params.low, params.high)
    boxes, box_scores = mask_to_boxes(mask, scores, names, params.min_box_area)
    return Labels(tuple(boxes), tuple(box_scores), mask)


def write_labels(
    out: Path,
    stems: Sequence[str],
    labels: Sequence[Labels],
    sizes: Sequence[tuple[int, int]],
    names: Sequence[str],
    method: str,
    task: str = "detect",
) -> None:
    """The prelabels folder: labels/, masks/ (when any), manifest.csv; replaced whole."""
    from PIL import Image

    rows = []
    with fsio.replace_dir(out) as scratch:
        for stem, found, (width, height) in zip(stems, labels, sizes, strict=True):
            lines = [yolo_line(box, names.index(box.label), width, height, task) for box in found.boxes]
            fsio.write_text(layout.label_file(scratch, stem), "".join(f"{line}\n" for line in lines))
            if found.mask is not None:
                fsio.write_png(scratch / "masks" / f"{stem}.png", Image.fromarray(found.mask))
            rows.append(
                {
                    "file": f"labels/{stem}.txt",
                    "method": method,
                    "boxes": len(lines),
                    "scores": json.dumps(list(found.scores)),
                }
            )
        write_manifest(scratch / MANIFEST, PRELABEL_COLUMNS, rows)


def main(params: Params, *, subject: str, generated: Path, weights: Path, out: Path) -> None:
    """Entry point: label every image listed in `generated`'s manifest. Under torchrun, on one
    node or several, each process labels its share by global rank and rank 0 writes the folder."""
    from genfusion.images import read_header
    from genfusion.launch import gather_to_main, process_state, share_label

    settings = params.prelabel
    rows = read_manifest(generated / MANIFEST)
    if not rows:
        raise GenfusionError(
            f"{generated / MANIFEST}: no generated images listed; run `dvc repro generate@{subject}` first"
        )
    device = params.train.device if settings.method == "detector" else "cpu"
    state = process_state(device)
    # Process p labels images p, p + n, p + 2n, ...; rank 0 puts them back in manifest order.
    share = range(state.process_index, len(rows), state.num_processes)
    mine = list(rows.values())[state.process_index :: state.num_processes]
    images = [generated / row["file"] for row in mine]
    sizes = [read_header(path).size for path in images]
    if settings.method == "detector":
        device = str(state.device) if state.num_processes > 1 else device
        labels = detect(weights, images, params.classes, settings, params.train.imgsz, device)
    else:
        labels = []
        for row, path, size in progress_bar(
            list(zip(mine, images, sizes, strict=True)),
            f"prelabel@{subject} ({share_label(state, len(images))})",
        ):
            maps_path = generated / "attention" / f"{path.stem}.npz"
            if row.get("attention") is None or not maps_path.is_file():
                raise GenfusionError(
                    f"{maps_path}: no attention maps; they are captured while generating when"
                    f" prelabel.method is attention: rerun `dvc repro generate@{subject}`"
                )
            with np.load(maps_path) as maps:
                labels.append(attention_labels(dict(maps), size, params.classes, settings))
    found = gather_to_main(state, list(zip(share, images, labels, sizes, strict=True)))
    if state.is_main_process:
        _, images, labels, sizes = zip(*sorted(found, key=lambda item: item[0]), strict=True)
        stems = [path.stem for path in images]
        write_labels(out, stems, labels, sizes, params.classes, settings.method, params.task)
    state.wait_for_everyone()
