"""`evaluate@variant-seed` and `evaluate_extra@variant-seed-set` stages: a detector scored on whole scenes.

Each scene of the set is predicted whole (sliced, the slices' boxes merged, as `genfusion predict`
does) and scored against the scene's own boxes, so an object is counted once however the scene
was tiled: COCO AP@0.5:0.95, AP50, AP75, and precision and recall at IoU 0.5 of the detections
scoring at least `evaluate.pr_conf`. The detections are kept (COCO results JSON) for the report's
bootstrap intervals. On the held-out test split the stage also writes the precision-recall curve
(a DVC plot) and the tile-level figures of the earlier protocol (Ultralytics' validation on the
test tiles, `tile_*` keys), which count an object in a tile overlap once per tile.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path

import numpy as np

from genfusion import fsio, layout, scoring
from genfusion.params import Params, TrainParams
from genfusion.scene_detection import detect_scenes, load_detector
from genfusion.scenes import check_same_import, read_scene_set


def model_name(model: str) -> str:
    """`yolov8n.yaml` and `weights/yolov8n.pt` are both 'yolov8n' in the report."""
    return Path(model).stem


def pr_curve_csv(curve: np.ndarray) -> str:
    """Precision at COCO's 101 recall points, as CSV text with columns recall, precision."""
    text = io.StringIO()
    rows = csv.writer(text, lineterminator="\n")
    rows.writerow(["recall", "precision"])
    rows.writerows((f"{r:.2f}", f"{p:.5f}") for r, p in zip(scoring.RECALL_POINTS, curve, strict=True))
    return text.getvalue()


def tile_metrics(weights: Path, data_yaml: Path, train_params: TrainParams, params: Params) -> dict:
    """The earlier protocol: Ultralytics' validation on the test split's tiles (box, and mask AP
    for a segmentation model), as `tile_*` keys."""
    model = load_detector(weights)
    with tempfile.TemporaryDirectory(prefix="genfusion-val-") as scratch:
        result = model.val(
            data=str(data_yaml.resolve()), split="test", imgsz=train_params.imgsz, batch=train_params.batch,
            conf=params.evaluate.conf, iou=params.evaluate.iou, device=train_params.device,
            workers=train_params.workers, project=scratch, name="test", plots=False, verbose=False,
        )  # fmt: skip
    metrics = {"tile_map": float(result.box.map), "tile_map50": float(result.box.map50)}
    if hasattr(result, "seg"):  # a segmentation model (task: segment): its masks are scored too
        metrics |= {
            "tile_mask_map": float(result.seg.map),
            "tile_mask_map50": float(result.seg.map50),
            "tile_mask_map75": float(result.seg.map75),
        }
    return metrics


def main(
    params: Params,
    *,
    weights: Path,
    scenes: Path,
    variant: str,
    seed: int,
    out: Path,
    detections: Path,
    pr: Path | None = None,
    data: Path | None = None,
    real: Path | None = None,
) -> None:
    scene_set = read_scene_set(scenes)
    if real is not None:
        check_same_import(scene_set, real)
    found = detect_scenes(weights, scene_set, params)
    matches = scoring.match(scene_set.ground_truth, found, params.evaluate.bootstrap_cell)
    metrics, curve = scoring.score(matches, params.evaluate.pr_conf)
    record = {
        "variant": variant,
        "seed": seed,
        "model": model_name(params.train.model),
        "scenes": len(scene_set.images),
        "objects": len(scene_set.ground_truth["annotations"]),
        **metrics,
    }
    if data is not None:
        record |= tile_metrics(weights, data / layout.DATASET_YAML, params.train, params)
        counts = json.loads((data / "counts.json").read_text())
        record |= {"train_images": counts["train_images"], "synthetic_images": counts["synthetic_images"]}
    if pr is not None:
        fsio.write_text(pr, pr_curve_csv(curve))
    fsio.write_json(detections, found)
    fsio.write_json(out, record)
