"""COCO scoring of detections on whole scenes, and bootstrap intervals of the scores.

pycocotools matches every detection to the scene's boxes at the ten IoU thresholds 0.5:0.95
(COCO's rules: best score first, each box matched once). Average precision is then accumulated
here from those matches, as COCOeval's `accumulate` does (101 recall points, the precision
envelope, the mean over classes; the tests check the figures equal COCOeval's), because the
bootstrap recomputes it for resampled parts of the test set many times over.

The bootstrap resamples *units*: square cells of `evaluate.bootstrap_cell` px of every test
scene (each box and detection belongs to the cell of its centre), or whole images when the
cell is null. One scene of a few hundred objects is many cells, so it still has an interval;
neighbouring objects, which share light and crowding, move together.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)
METRICS = ("map", "map50", "map75")


def _coco(dataset: dict):
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco.createIndex()
    return coco


@dataclass(frozen=True)
class Matches:
    """Each detection's score, class, unit and matches; each box's class and unit."""

    score: np.ndarray  # (D,)
    category: np.ndarray  # (D,)
    unit: np.ndarray  # (D,)
    matched: np.ndarray  # (T, D) bool: matched a box at IoU threshold t
    ignored: np.ndarray  # (T, D) bool: matched a box COCO ignores
    box_category: np.ndarray  # (G,)
    box_unit: np.ndarray  # (G,)
    categories: tuple[int, ...]
    units: int


def units_of(images: Sequence[dict], cell: int | None) -> tuple[dict[int, tuple[int, int, int]], int]:
    """{image id: (first unit, columns, rows)} and the number of units."""
    first, table = 0, {}
    for image in images:
        columns = 1 if cell is None else math.ceil(image["width"] / cell)
        rows = 1 if cell is None else math.ceil(image["height"] / cell)
        table[image["id"]] = (first, columns, rows)
        first += columns * rows
    return table, first


def _unit(bbox: Sequence[float], grid: tuple[int, int, int], cell: int | None) -> int:
    first, columns, rows = grid
    if cell is None:
        return first
    column = min(max(int((bbox[0] + bbox[2] / 2) // cell), 0), columns - 1)
    row = min(max(int((bbox[1] + bbox[3] / 2) // cell), 0), rows - 1)
    return first + row * columns + column


def match(ground_truth: dict, detections: Sequence[dict], cell: int | None) -> Matches:
    """COCO matching of `detections` (COCO results: image_id, category_id, bbox, score) against
    `ground_truth` (a COCO dataset), every detection counted (no per-image cap)."""
    from pycocotools.cocoeval import COCOeval

    truth = _coco(ground_truth)
    found = _coco(
        {
            "images": ground_truth["images"],
            "categories": ground_truth["categories"],
            "annotations": [
                {**d, "id": i, "area": d["bbox"][2] * d["bbox"][3], "iscrowd": 0}
                for i, d in enumerate(detections, start=1)
            ],
        }
    )
    evaluation = COCOeval(truth, found, "bbox")
    per_image = max([*np.bincount([d["image_id"] for d in detections]).tolist(), 1]) if detections else 1
    evaluation.params.maxDets = [per_image]
    evaluation.params.areaRng = [[0.0, 1e12]]
    evaluation.params.areaRngLbl = ["all"]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation.evaluate()
    grids, units = units_of(ground_truth["images"], cell)
    scores, categories, unit, matched, ignored = [], [], [], [], []
    box_category, box_unit = [], []
    for record in evaluation.evalImgs:
        if record is None:
            continue
        grid = grids[record["image_id"]]
        for dt_id in record["dtIds"]:
            unit.append(_unit(found.anns[dt_id]["bbox"], grid, cell))
        scores.extend(record["dtScores"])
        categories.extend([record["category_id"]] * len(record["dtIds"]))
        matched.append(np.asarray(record["dtMatches"]).reshape(len(IOU_THRESHOLDS), -1) > 0)
        ignored.append(np.asarray(record["dtIgnore"]).reshape(len(IOU_THRESHOLDS), -1).astype(bool))
        for gt_id, gt_ignored in zip(record["gtIds"], record["gtIgnore"], strict=True):
            if not gt_ignored:
                box_category.append(record["category_id"])
                box_unit.append(_unit(truth.anns[gt_id]["bbox"], grid, cell))
    empty = np.zeros((len(IOU_THRESHOLDS), 0), dtype=bool)
    return Matches(
        score=np.asarray(scores, dtype=float),
        category=np.asarray(categories, dtype=int),
        unit=np.asarray(unit, dtype=int),
        matched=np.concatenate([empty, *matched], axis=1),
        ignored=np.concatenate([empty, *ignored], axis=1),
        box_category=np.asarray(box_category, dtype=int),
        box_unit=np.asarray(box_unit, dtype=int),
        categories=tuple(c["id"] for c in ground_truth["categories"]),
        units=units,
    )


def precision_curves(
    score: np.ndarray, category: np.ndarray, matched: np.ndarray, ignored: np.ndarray, boxes: dict[int, int]
) -> np.ndarray:
    """COCO's interpolated precision, (classes with boxes, T, 101 recall points), from detections
    in their listed order (stable sort by score, as COCOeval) and the number of boxes per class."""
    curves = []
    for class_id, count in boxes.items():
        if count == 0:
            continue
        chosen = category == class_id
        order = np.argsort(-score[chosen], kind="mergesort")
        hit, skip = matched[:, chosen][:, order], ignored[:, chosen][:, order]
        true_pos = np.cumsum(hit & ~skip, axis=1)
        false_pos = np.cumsum(~hit & ~skip, axis=1)
        recall = true_pos / count
        precision = true_pos / (true_pos + false_pos + np.spacing(1))
        precision = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
        curve = np.zeros((len(IOU_THRESHOLDS), len(RECALL_POINTS)))
        for t in range(len(IOU_THRESHOLDS)):
            at = np.searchsorted(recall[t], RECALL_POINTS, side="left")
            inside = at < recall.shape[1]
            curve[t, inside] = precision[t, at[inside]]
        curves.append(curve)
    return np.asarray(curves).reshape(-1, len(IOU_THRESHOLDS), len(RECALL_POINTS))


def _ap(curves: np.ndarray) -> dict[str, float]:
    if len(curves) == 0:
        return dict.fromkeys(METRICS, 0.0)
    at_50, at_75 = curves[:, 0].mean(), curves[:, 5].mean()
    return {"map": float(curves.mean()), "map50": float(at_50), "map75": float(at_75)}


def _boxes(matches: Matches, categories: np.ndarray) -> dict[int, int]:
    return {c: int((categories == c).sum()) for c in matches.categories}


def score(matches: Matches, count_conf: float) -> tuple[dict[str, float], np.ndarray]:
    """AP@0.5:0.95, AP50, AP75, and precision and recall at IoU 0.5 of the detections scoring
    at least `count_conf` (pooled over classes); and the PR curve at IoU 0.5 (mean over classes)."""
    boxes = _boxes(matches, matches.box_category)
    curves = precision_curves(matches.score, matches.category, matches.matched, matches.ignored, boxes)
    counted = (matches.score >= count_conf) & ~matches.ignored[0]
    hits = int((matches.matched[0] & counted).sum())
    total = sum(boxes.values())
    metrics = _ap(curves) | {
        "precision": hits / int(counted.sum()) if counted.any() else 0.0,
        "recall": hits / total if total else 0.0,
    }
    curve = curves[:, 0].mean(axis=0) if len(curves) else np.zeros(len(RECALL_POINTS))
    return metrics, curve


def unit_draws(units: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, units) unit indices drawn with replacement; the same for every detector scored
    on one test set, so that differences between detectors are paired."""
    return np.random.default_rng(seed).integers(0, units, size=(resamples, units))


def _by_unit(members: np.ndarray, units: int) -> tuple[np.ndarray, np.ndarray]:
    """Member indices sorted by unit, and where each unit's run starts."""
    order = np.argsort(members, kind="stable")
    return order, np.searchsorted(members[order], np.arange(units + 1))


def _gather(by_unit: tuple[np.ndarray, np.ndarray], draw: np.ndarray) -> np.ndarray:
    """Indices of the members of each drawn unit, in draw order."""
    order, starts = by_unit
    counts = (starts[1:] - starts[:-1])[draw]
    first = starts[:-1][draw]
    offsets = np.repeat(first - np.cumsum(counts) + counts, counts)
    return order[offsets + np.arange(counts.sum())]


def bootstrap(matches: Matches, draws: np.ndarray) -> dict[str, np.ndarray]:
    """AP@0.5:0.95, AP50 and AP75 of every resample of units in `draws`."""
    out = {key: np.zeros(len(draws)) for key in METRICS}
    detections = _by_unit(matches.unit, matches.units)
    objects = _by_unit(matches.box_unit, matches.units)
    for b, draw in enumerate(draws):
        rows = _gather(detections, draw)
        boxes = _boxes(matches, matches.box_category[_gather(objects, draw)])
        hit, skip = matches.matched[:, rows], matches.ignored[:, rows]
        curves = precision_curves(matches.score[rows], matches.category[rows], hit, skip, boxes)
        for key, value in _ap(curves).items():
            out[key][b] = value
    return out


def interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The percentile interval holding `level` of the bootstrap samples."""
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)
