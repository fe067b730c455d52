"""`label_quality` stage: how good the automatic labels are, as a DVC metric (metrics/labels.json).

Per subject, where people finished images (`data/annotations/<subject>/labels/`): precision and
recall at IoU 0.5 of the automatic labels against people's boxes (greedy matching, highest
score first, per class), and mask IoU where both sides have masks (an attention mask, or for
`task: segment` the labels' outlines drawn into one). And the detector
pre-labeller (the `real` detector at `prelabel.conf`) scored the same way on the real val split.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from genfusion import fsio, layout
from genfusion.boxes import Box, iou
from genfusion.errors import GenfusionError
from genfusion.formats.yolo import read_label_file
from genfusion.images import read_header
from genfusion.layout import IGNORE
from genfusion.params import PrelabelParams

if TYPE_CHECKING:
    from genfusion.params import Params

IOU = 0.5


def match(predicted: Sequence[Box], scores: Sequence[float], truth: Sequence[Box]) -> int:
    """True positives at IoU >= 0.5: each prediction, highest score first, takes the best
    still-free true box of its class."""
    free = list(truth)
    hits = 0
    for k in sorted(range(len(predicted)), key=lambda k: -scores[k]):
        box = predicted[k]
        candidates = [(iou(box, t), i) for i, t in enumerate(free) if t.label == box.label]
        best = max(candidates, default=(0.0, -1))
        if best[0] >= IOU:
            free.pop(best[1])
            hits += 1
    return hits


def counts_to_metrics(tp: int, predictions: int, truths: int) -> dict:
    return {
        "precision": tp / predictions if predictions else 0.0,
        "recall": tp / truths if truths else 0.0,
        "predictions": predictions,
        "truths": truths,
        "true_positives": tp,
    }


def mask_iou(auto: np.ndarray, people: np.ndarray, classes: int) -> float:
    """Mean over classes present on either side of the class IoU, pixels marked ignore left out."""
    valid = (auto != IGNORE) & (people != IGNORE)
    ious = []
    for c in range(1, classes + 1):
        a, p = (auto == c) & valid, (people == c) & valid
        union = (a | p).sum()
        if union:
            ious.append((a & p).sum() / union)
    return float(np.mean(ious)) if ious else 1.0


def outline_mask(boxes: Sequence[Box], names: Sequence[str], size: tuple[int, int]) -> np.ndarray:
    """Outlines drawn into a class mask (0 background, c+1 class c) of `size` (width, height):
    the pixels an outline covers or touches, at 1/16 px precision."""
    import cv2

    mask = np.zeros(size[::-1], dtype=np.uint8)
    for box in boxes:
        # Pixel k spans [k, k + 1): its centre k + 0.5 is where cv2 puts index k.
        points = np.round((np.asarray(box.polygon) - 0.5) * 16).astype(np.int32)
        cv2.fillPoly(mask, [points], names.index(box.label) + 1, shift=4)
    return mask


def label_mask(masks: Path, boxes: Sequence[Box], names: Sequence[str], size: tuple[int, int], task: str):
    """A labelled image's class mask: the saved mask, or for the segment task its outlines; None
    when it has neither."""
    from PIL import Image

    if masks.is_file():
        return np.asarray(Image.open(masks))
    return outline_mask(boxes, names, size) if task == "segment" else None


def subject_quality(
    prelabels: Path, annotations: Path, generated: Path, names: list[str], task: str = "detect"
) -> dict:
    """Automatic labels of one subject against the images people finished."""

    people = sorted(layout.labels_dir(annotations).glob("*.txt"))
    if not people:
        return {"annotated": 0, "note": "no people's labels yet"}
    manifest = {Path(row["file"]).stem: row for row in prelabel_rows(prelabels / layout.MANIFEST)}
    tp = predictions = truths = 0
    mask_scores = []
    for path in people:
        stem = path.stem
        if stem not in manifest:
            raise GenfusionError(
                f"{path}: people labelled {stem}, which has no automatic labels in {prelabels}"
            )
        size = read_header(layout.images_dir(generated) / f"{stem}.png").size
        truth = read_label_file(path, names, size)
        auto = read_label_file(layout.label_file(prelabels, stem), names, size)
        scores = json.loads(manifest[stem]["scores"])
        tp += match(auto, scores, truth)
        predictions += len(auto)
        truths += len(truth)
        auto_mask = label_mask(prelabels / "masks" / f"{stem}.png", auto, names, size, task)
        people_mask = label_mask(annotations / "masks" / f"{stem}.png", truth, names, size, task)
        if auto_mask is not None and people_mask is not None:
            mask_scores.append(mask_iou(auto_mask, people_mask, len(names)))
    result = {"annotated": len(people), **counts_to_metrics(tp, predictions, truths)}
    if mask_scores:
        result["mask_iou"] = float(np.mean(mask_scores))
    return result


def prelabel_rows(path: Path) -> list[dict[str, str]]:
    from genfusion.manifest import read_manifest

    rows = list(read_manifest(path).values())
    if not rows:
        raise GenfusionError(f"{path}: missing or empty; run the prelabel stage first")
    return rows


def detector_quality(
    weights: Path, real: Path, names: list[str], settings: PrelabelParams, imgsz: int, device: str
) -> dict:
    """The detector pre-labeller on the real val split, scored like the automatic labels."""
    from genfusion.detection import detect

    images = layout.image_files(real, "val")
    tp = predictions = truths = 0
    for path, found in zip(images, detect(weights, images, names, settings, imgsz, device), strict=True):
        truth = read_label_file(layout.label_file(real, path.stem, "val"), names, read_header(path).size)
        tp += match(found.boxes, found.scores, truth)
        predictions += len(found.boxes)
        truths += len(truth)
    return {"images": len(images), "conf": settings.conf, **counts_to_metrics(tp, predictions, truths)}


def main(
    params: Params,
    *,
    prelabels: Path,
    annotations: Path,
    generated: Path,
    real: Path,
    weights: Path,
    out: Path,
) -> None:
    report: dict = {
        "method": params.prelabel.method,
        "subjects": {
            name: subject_quality(
                prelabels / name, annotations / name, generated / name, params.classes, params.task
            )
            for name in params.subjects
        },
    }
    if weights.is_file():
        report["detector_on_real_val"] = detector_quality(
            weights, real, params.classes, params.prelabel, params.train.imgsz, params.train.device
        )
    fsio.write_json(out, report)
