"""`genfusion predict`: a trained detector run over whole scenes of any size.

Writes, in the output folder, `predictions.json` (a COCO dataset: the images, and every box with
its score), `predictions.csv` (one box per row: image, xmin, ymin, xmax, ymax, label, score) and,
for each georeferenced GeoTIFF, `<image stem>.geojson`: the boxes as polygons in the image's map
coordinates and CRS.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from genfusion import fsio
from genfusion.errors import GenfusionError
from genfusion.integrations.ultralytics import load_yolo
from genfusion.params import Params
from genfusion.prediction import Detections, check_slicing, predict_scene
from genfusion.scene_images import open_scene

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


def scene_files(paths: Sequence[Path]) -> list[Path]:
    """The images named, a folder standing for the images directly in it."""
    files = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise GenfusionError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise GenfusionError(f"{path}: no such image or folder")
    return files


def geojson(found: Detections, names: dict[int, str], crs, transform) -> dict:
    """The boxes as polygons in map coordinates (GeoJSON, with the raster's CRS named)."""
    from rasterio.transform import xy

    features = []
    for (x0, y0, x1, y1), score, class_index in zip(found.boxes, found.scores, found.classes, strict=True):
        columns, rows = [x0, x1, x1, x0, x0], [y0, y0, y1, y1, y0]
        xs, ys = xy(transform, rows, columns, offset="ul")  # pixel corners, not centres
        features.append(
            {
                "type": "Feature",
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[[float(x), float(y)] for x, y in zip(xs, ys, strict=True)]],
                },
                "properties": {"label": names[int(class_index)], "score": round(float(score), 5)},
            }
        )
    return {
        "type": "FeatureCollection",
        "crs": {"type": "name", "properties": {"name": crs.to_string()}},
        "features": features,
    }


def main(params: Params, *, weights: Path, images: Sequence[Path], out: Path) -> None:
    if not weights.is_file():
        raise GenfusionError(f"{weights}: weights file not found")
    model = load_yolo(weights)
    check_slicing(model, weights, params.predict)
    names = {int(k): v for k, v in model.names.items()}
    coco = {
        "images": [],
        "annotations": [],
        "categories": [{"id": i + 1, "name": n} for i, n in names.items()],
    }
    table = io.StringIO()
    rows = csv.writer(table, lineterminator="\n")
    rows.writerow(["image", "xmin", "ymin", "xmax", "ymax", "label", "score"])
    maps = {}
    files = scene_files(images)
    stems = [path.stem for path in files]
    twice = sorted({stem for stem in stems if stems.count(stem) > 1})
    if twice:
        raise GenfusionError(
            f"several images are named {twice[0]!r} (e.g. in different folders or as .tif and .tiff);"
            " their outputs would overwrite each other: predict them into separate --out folders"
        )
    converted: Counter = Counter()
    for image_id, path in enumerate(files, start=1):
        scene = open_scene(path, params.seeds.max_pixels)
        converted.update(scene.conversions)
        if scene.conversions:
            log.warning(
                "%s: converted to 8-bit RGB (%s) before prediction", path, ", ".join(scene.conversions)
            )
        try:
            found = predict_scene(
                model, scene, params.predict, conf=params.predict.conf, iou=params.predict.iou,
                imgsz=params.train.imgsz, device=params.train.device,
            )  # fmt: skip
            if scene.crs is not None:
                maps[f"{path.stem}.geojson"] = geojson(found, names, scene.crs, scene.transform)
            elif path.suffix.lower() in (".tif", ".tiff"):
                log.warning("%s: no CRS (not georeferenced): no GeoJSON written for it", path)
        finally:
            scene.close()
        width, height = scene.size
        coco["images"].append({"id": image_id, "file_name": str(path), "width": width, "height": height})
        for (x0, y0, x1, y1), score, class_index in zip(
            found.boxes, found.scores, found.classes, strict=True
        ):
            box = [round(float(v), 2) for v in (x0, y0, x1 - x0, y1 - y0)]
            annotation = {
                "id": len(coco["annotations"]) + 1,
                "image_id": image_id,
                "category_id": int(class_index) + 1,
            }
            annotation |= {"bbox": box, "area": round(box[2] * box[3], 2), "iscrowd": 0}
            coco["annotations"].append(annotation | {"score": round(float(score), 5)})
            corners = (f"{float(v):.2f}" for v in (x0, y0, x1, y1))
            rows.writerow([str(path), *corners, names[int(class_index)], f"{float(score):.5f}"])
        log.info("predict: %s: %d boxes", path, len(found))
    if converted:
        log.info("predict: images converted to 8-bit RGB, by kind: %s", dict(sorted(converted.items())))
    fsio.write_text(out / "predictions.json", json.dumps(coco) + "\n")
    fsio.write_text(out / "predictions.csv", table.getvalue())
    for name, collection in maps.items():
        fsio.write_json(out / name, collection)
