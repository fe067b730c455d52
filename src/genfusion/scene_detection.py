"""A trained detector on every whole scene of a scene set: sliced prediction (`prediction`), the
slices' boxes merged, as COCO results. What the evaluate stage scores, and what export compares
between the PyTorch and ONNX models."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from genfusion.errors import GenfusionError
from genfusion.integrations.ultralytics import load_yolo
from genfusion.prediction import check_slicing, predict_scene
from genfusion.scene_images import open_scene

if TYPE_CHECKING:
    from genfusion.params import Params
    from genfusion.scenes import SceneSet


def load_detector(weights: Path):
    if not weights.is_file():
        raise GenfusionError(f"{weights}: trained weights not found; run the train stage first")
    return load_yolo(weights)


def detect_scenes(weights: Path, scenes: SceneSet, params: Params) -> list[dict]:
    """The detector's boxes on every scene of the set, as COCO results (category id = class + 1)."""
    model = load_detector(weights)
    check_slicing(model, weights, params.predict)
    results = []
    for entry in scenes.images:
        scene = open_scene(scenes.image(entry), None)  # the project's own copy: no limit
        try:
            found = predict_scene(
                model, scene, params.predict, conf=params.evaluate.conf, iou=params.evaluate.iou,
                imgsz=params.train.imgsz, device=params.train.device,
            )  # fmt: skip
        finally:
            scene.close()
        for box, score, class_index in zip(found.boxes, found.scores, found.classes, strict=True):
            x0, y0, x1, y1 = (round(float(v), 2) for v in box)
            results.append(
                {
                    "image_id": entry["id"],
                    "category_id": int(class_index) + 1,
                    "bbox": [x0, y0, round(x1 - x0, 2), round(y1 - y0, 2)],
                    "score": round(float(score), 5),
                }
            )
    return results
