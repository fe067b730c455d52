"""Sliced prediction: a detector run over a whole scene of any size, slice by slice, its boxes merged.

A scene is read window by window where its format allows (`scene_images`). Each slice of
`predict.slice` px goes through the detector at its training size, in batches; the boxes go back
to scene pixels and the duplicates that overlapping slices make are merged. Merging finds the
overlapping pairs with an R-tree (shapely's STRtree), so its cost grows with the number of boxes,
not with its square; the greedy rule is SAHI's (`sahi.postprocess.combine`), and the tests check
that both keep the same boxes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from genfusion.errors import GenfusionError
from genfusion.progress import progress_bar
from genfusion.tiling import Window, tile_windows

if TYPE_CHECKING:
    from ultralytics import YOLO

    from genfusion.params import PredictParams
    from genfusion.scene_images import SceneImage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Detections:
    """Boxes in scene pixels (x0, y0, x1, y1), their scores and class indices."""

    boxes: np.ndarray  # (n, 4) float
    scores: np.ndarray  # (n,) float
    classes: np.ndarray  # (n,) int

    def __len__(self) -> int:
        return len(self.scores)

    @staticmethod
    def concat(parts: Sequence[Detections]) -> Detections:
        if not parts:
            return Detections(np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=int))
        return Detections(
            np.concatenate([p.boxes for p in parts]).reshape(-1, 4),
            np.concatenate([p.scores for p in parts]),
            np.concatenate([p.classes for p in parts]).astype(int),
        )


def batches(items: Sequence[Window], size: int) -> Iterator[Sequence[Window]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def check_slicing(model: YOLO, weights: Path, params: PredictParams) -> None:
    """Refuse a model that is not a detector, and a slice the model cannot see whole."""
    if getattr(model, "task", None) not in ("detect", "segment"):
        raise GenfusionError(
            f"{weights}: a YOLO {model.task} model, not a detector; give a detector's weights"
        )
    stride = int(max(model.model.stride)) if hasattr(model.model, "stride") else 32
    if params.slice < stride:
        raise GenfusionError(
            f"predict.slice ({params.slice} px) is smaller than the model's stride ({stride} px)"
        )


def predict_scene(
    model: YOLO,
    scene: SceneImage,
    params: PredictParams,
    *,
    conf: float,
    iou: float,
    imgsz: int,
    device: str,
) -> Detections:
    """Every detection in the scene, slices merged (`params.merge`)."""
    windows = tile_windows(*scene.size, params.slice, params.overlap)
    parts = []
    steps = list(batches(windows, params.batch))
    for batch in progress_bar(steps, f"predict: {scene.path.name}", total=len(steps)):
        # Ultralytics reads numpy images as OpenCV's BGR.
        pixels = [np.ascontiguousarray(scene.read(w)[:, :, ::-1]) for w in batch]
        results = model.predict(pixels, imgsz=imgsz, conf=conf, iou=iou, device=device, verbose=False)
        for window, result in zip(batch, results, strict=True):
            found = result.boxes
            offset = np.array([window.x0, window.y0, window.x0, window.y0], dtype=float)
            parts.append(
                Detections(
                    found.xyxy.cpu().numpy().astype(float) + offset,
                    found.conf.cpu().numpy().astype(float),
                    found.cls.cpu().numpy().astype(int),
                )
            )
    return merge(Detections.concat(parts), params.merge, params.match_metric, params.match_threshold)


def overlapping_pairs(boxes: np.ndarray, classes: np.ndarray, metric: str, threshold: float):
    """(i, j) for every two boxes of one class whose IoU (or IoS: intersection over the smaller
    box) is at least `threshold`, found through an R-tree."""
    import shapely

    geometries = shapely.box(*boxes.T)
    left, right = shapely.STRtree(geometries).query(geometries, predicate="intersects")
    same = (left != right) & (classes[left] == classes[right])
    left, right = left[same], right[same]
    a, b = boxes[left], boxes[right]
    width = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    height = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = width * height
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a + area_b - inter if metric == "iou" else np.minimum(area_a, area_b)
    value = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    close = value >= threshold
    return left[close], right[close]


def greedy_groups(detections: Detections, metric: str, threshold: float) -> list[np.ndarray]:
    """Groups of duplicates, best first: each box in score order keeps every box still free that
    matches it (SAHI's greedy rule). The first index of a group is its best box."""
    n = len(detections)
    left, right = overlapping_pairs(detections.boxes, detections.classes, metric, threshold)
    order = np.argsort(left, kind="stable")
    left, right = left[order], right[order]
    starts = np.searchsorted(left, np.arange(n + 1))
    taken = np.zeros(n, dtype=bool)
    groups = []
    for best in np.argsort(-detections.scores, kind="stable"):
        if taken[best]:
            continue
        matched = right[starts[best] : starts[best + 1]]
        matched = matched[~taken[matched]]
        taken[best] = True
        taken[matched] = True
        groups.append(np.concatenate([[best], matched]))
    return groups


def merge(detections: Detections, method: str, metric: str, threshold: float) -> Detections:
    """Duplicates from overlapping slices made one: `nms` keeps each group's best box; `nmm` joins
    the group into the box around it all (a crown cut by a slice edge is made whole again); `wbf`
    averages the group's corners weighted by score. A group keeps its best score."""
    if len(detections) == 0:
        return detections
    groups = greedy_groups(detections, metric, threshold)
    best = np.array([group[0] for group in groups])
    boxes = detections.boxes
    if method == "nmm":
        merged = np.array(
            [[*boxes[g, :2].min(axis=0), *boxes[g, 2:].max(axis=0)] for g in groups], dtype=float
        ).reshape(-1, 4)
    elif method == "wbf":
        weights = detections.scores
        merged = np.array([np.average(boxes[g], axis=0, weights=weights[g]) for g in groups]).reshape(-1, 4)
    else:
        merged = boxes[best]
    return Detections(merged, detections.scores[best], detections.classes[best])
