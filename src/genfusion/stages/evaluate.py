"""`evaluate@variant-seed` stage: every detector scored on the same real test split.

Writes AP@0.5:0.95, AP50, AP75, precision and recall (and mask AP for a segmentation model)
as a DVC metric, and the box precision-recall curve (at IoU 0.5, mean over classes) as a DVC plot.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path

import numpy as np

from genfusion import fsio, layout
from genfusion.errors import GenfusionError
from genfusion.integrations.ultralytics import load_yolo
from genfusion.params import EvaluateParams, Params, TrainParams

# The PR curve is kept at 101 recall points (COCO's own sampling), enough for a plot.
PR_POINTS = np.linspace(0.0, 1.0, 101)


def model_name(model: str) -> str:
    """`yolov8n.yaml` and `weights/yolov8n.pt` are both 'yolov8n' in the report."""
    return Path(model).stem


def pr_curve_csv(recall: np.ndarray, precision: np.ndarray) -> str:
    """Precision at `PR_POINTS` recall levels, as CSV text with columns recall, precision."""
    sampled = np.interp(PR_POINTS, recall, precision)
    text = io.StringIO()
    rows = csv.writer(text, lineterminator="\n")
    rows.writerow(["recall", "precision"])
    rows.writerows((f"{r:.2f}", f"{p:.5f}") for r, p in zip(PR_POINTS, sampled, strict=True))
    return text.getvalue()


def evaluate_detector(
    weights: Path, data_yaml: Path, train_params: TrainParams, params: EvaluateParams
) -> tuple[dict, str]:
    """Score `weights` on the test split of `data_yaml`: (metrics, PR curve CSV)."""
    if not weights.is_file():
        raise GenfusionError(f"{weights}: trained weights not found; run the train stage first")
    model = load_yolo(weights)
    with tempfile.TemporaryDirectory(prefix="genfusion-val-") as scratch:
        result = model.val(
            data=str(data_yaml.resolve()),
            split="test",
            imgsz=train_params.imgsz,
            batch=train_params.batch,
            conf=params.conf,
            iou=params.iou,
            device=train_params.device,
            workers=train_params.workers,
            project=scratch,
            name="test",
            plots=False,
            verbose=False,
        )
    box = result.box
    metrics = {
        "map": float(box.map),
        "map50": float(box.map50),
        "map75": float(box.map75),
        "precision": float(box.mp),
        "recall": float(box.mr),
    }
    if hasattr(result, "seg"):  # a segmentation model (task: segment): its masks are scored too
        masks = result.seg
        metrics |= {
            "mask_map": float(masks.map),
            "mask_map50": float(masks.map50),
            "mask_map75": float(masks.map75),
        }
    precision = np.asarray(box.prec_values).mean(axis=0) if len(box.prec_values) else np.zeros(1000)
    return metrics, pr_curve_csv(np.asarray(box.px), precision)


def main(params: Params, *, weights: Path, data: Path, variant: str, seed: int, out: Path, pr: Path) -> None:
    metrics, pr_csv = evaluate_detector(weights, data / layout.DATASET_YAML, params.train, params.evaluate)
    counts = json.loads((data / "counts.json").read_text())
    record = {
        "variant": variant,
        "seed": seed,
        "model": model_name(params.train.model),
        **metrics,
        "train_images": counts["train_images"],
        "synthetic_images": counts["synthetic_images"],
    }
    fsio.write_text(pr, pr_csv)
    fsio.write_json(out, record)
