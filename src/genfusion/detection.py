"""A trained detector's boxes (and outlines, for a segmentation model) on a list of images: the
automatic labels of the `prelabel` stage's detector method, and the real detector scored by
`label_quality`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from genfusion.boxes import Box
from genfusion.errors import GenfusionError
from genfusion.progress import progress_bar

if TYPE_CHECKING:
    from genfusion.params import PrelabelParams


@dataclass(frozen=True)
class Labels:
    """One image's automatic labels: boxes with scores, and a mask for the attention method."""

    boxes: tuple[Box, ...]
    scores: tuple[float, ...]
    mask: np.ndarray | None = None


def detect(
    weights: Path,
    images: Sequence[Path],
    names: Sequence[str],
    settings: PrelabelParams,
    imgsz: int,
    device: str,
) -> list[Labels]:
    """Boxes the detector finds with confidence >= prelabel.conf, per image."""
    from genfusion.integrations.ultralytics import load_yolo

    if not Path(weights).is_file():
        raise GenfusionError(
            f"{weights}: detector weights not found; train it first (`dvc repro train@real-<seed>`)"
            " or set prelabel.method: attention"
        )
    model = load_yolo(weights)
    found = []
    for path in progress_bar(images, f"detect ({len(images)} images)"):
        result = model.predict(
            str(path), conf=settings.conf, iou=settings.iou, imgsz=imgsz, device=device, verbose=False
        )[0]
        xyxy = result.boxes.xyxy.cpu().numpy()
        classes = result.boxes.cls.cpu().numpy().astype(int)
        confidences = result.boxes.conf.cpu().numpy()
        # A segmentation model (task: segment) also gives each object's outline.
        outlines = result.masks.xy if result.masks is not None else [None] * len(xyxy)
        order = np.argsort(-confidences, kind="stable")
        found.append(
            Labels(
                tuple(detected_object(names[classes[i]], xyxy[i], outlines[i]) for i in order),
                tuple(round(float(confidences[i]), 4) for i in order),
            )
        )
    return found


def detected_object(name: str, xyxy: np.ndarray, outline: np.ndarray | None) -> Box:
    """A detection as a label; a segmentation model's with its outline (the box's own outline
    when the mask is too small to trace at the model's mask resolution)."""
    box = Box(name, *map(float, xyxy))
    if outline is None:
        return box
    if len(outline) < 3:
        return replace(box, polygon=box.corners)
    return replace(box, polygon=tuple((float(x), float(y)) for x, y in outline))
