"""`export@variant-seed` stage: a trained detector as ONNX, checked against the PyTorch model.

Ultralytics writes the ONNX model (dynamic batch and size, simplified by onnxslim) from a copy of
the weights, so the train stage's output folder is never touched. The check scores both models
on the test scenes exactly as the evaluate stage does (sliced prediction, slices merged); the
stage fails, writing nothing, when their AP differs by more than `PARITY_TOLERANCE`, so an export
that changed the model never lands. The figures are a DVC metric.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from genfusion import fsio, scoring
from genfusion.errors import GenfusionError
from genfusion.integrations.ultralytics import settle_export
from genfusion.params import Params
from genfusion.scene_detection import detect_scenes, load_detector
from genfusion.scenes import read_scene_set

# The largest AP difference (AP50 or AP@0.5:0.95) between the ONNX and the PyTorch model accepted.
PARITY_TOLERANCE = 0.005


def export_onnx(weights: Path, imgsz: int, scratch: Path) -> Path:
    copy = scratch / weights.name
    shutil.copyfile(weights, copy)
    exported = load_detector(copy).export(
        format="onnx", imgsz=imgsz, dynamic=True, simplify=True, device="cpu"
    )
    settle_export(Path(exported))
    return Path(exported)


def main(params: Params, *, weights: Path, scenes: Path, out: Path, metrics: Path) -> None:
    scene_set = read_scene_set(scenes)
    with tempfile.TemporaryDirectory(prefix="genfusion-export-") as scratch:
        onnx = export_onnx(weights, params.train.imgsz, Path(scratch))
        scores, counts = {}, {}
        for kind, model in (("pytorch", weights), ("onnx", onnx)):
            found = detect_scenes(model, scene_set, params)
            matches = scoring.match(scene_set.ground_truth, found, params.evaluate.bootstrap_cell)
            scores[kind], _ = scoring.score(matches, params.evaluate.pr_conf)
            counts[kind] = len(found)
        record = {"tolerance": PARITY_TOLERANCE}
        for key in ("map50", "map"):
            record |= {f"pytorch_{key}": scores["pytorch"][key], f"onnx_{key}": scores["onnx"][key]}
            record[f"{key}_difference"] = abs(scores["onnx"][key] - scores["pytorch"][key])
        record |= {"pytorch_detections": counts["pytorch"], "onnx_detections": counts["onnx"]}
        worst = max(record["map50_difference"], record["map_difference"])
        if worst > PARITY_TOLERANCE:
            raise GenfusionError(
                f"{weights}: the ONNX export scores AP {worst:.4f} away from the PyTorch model on"
                f" {scenes} (tolerance {PARITY_TOLERANCE}); not written. Figures: {record}"
            )
        fsio.write_bytes(out, onnx.read_bytes())
    fsio.write_json(metrics, record | {"parity": True})
