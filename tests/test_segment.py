"""The segmentation path (`task: segment`): outlines read from seed formats, cut by tiles, traced
from attention masks, and a YOLO segmentation model trained and scored on masks by `dvc repro`."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from PIL import Image
from project import ROOT, project_repo, run

from genfusion.boxes import Box, clip_polygon, polygon_box
from genfusion.errors import GenfusionError
from genfusion.formats import read_annotations
from genfusion.formats.yolo import parse_yolo_line, yolo_line
from genfusion.params import load_params
from genfusion.stages import label_quality, prelabel
from genfusion.stages.seeds import run_seeds

FIXTURE = ROOT / "tests" / "data" / "seg-trees"


def shoelace(points) -> float:
    points = list(points)
    return (
        abs(
            sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1], strict=True))
        )
        / 2
    )


def test_coco_polygons_become_outlines_with_their_bounds() -> None:
    coco = json.loads((FIXTURE / "annotations.json").read_text())
    items = {item.image.name: item for item in read_annotations(FIXTURE / "annotations.json")}
    names = {image["id"]: image["file_name"] for image in coco["images"]}
    expected: dict[str, list] = {name: [] for name in names.values()}
    for annotation in coco["annotations"]:
        flat = annotation["segmentation"][0]
        expected[names[annotation["image_id"]]].append(list(zip(flat[::2], flat[1::2], strict=True)))
    assert {name: [list(box.polygon) for box in item.boxes] for name, item in items.items()} == expected
    box = items["OSBS_029_crop0.png"].boxes[0]
    xs, ys = [x for x, _ in box.polygon], [y for _, y in box.polygon]
    assert (box.x0, box.y0, box.x1, box.y1) == (min(xs), min(ys), max(xs), max(ys))


def test_coco_run_length_masks_are_refused_with_the_fix(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    coco = {
        "images": [{"id": 1, "file_name": "a.png"}],
        "categories": [{"id": 1, "name": "Tree"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": {"counts": "x"}}],
    }
    (tmp_path / "c.json").write_text(json.dumps(coco))
    with pytest.raises(GenfusionError, match=r"c\.json: annotations\[0\]: segmentation is a run-length mask"):
        read_annotations(tmp_path / "c.json")


def test_label_studio_polygons_in_percent_become_pixel_outlines(tmp_path: Path) -> None:
    Image.new("RGB", (200, 100)).save(tmp_path / "a.png")
    result = {
        "type": "polygonlabels",
        "original_width": 200,
        "original_height": 100,
        "value": {"points": [[10, 20], [50, 20], [50, 80]], "polygonlabels": ["Tree"]},
    }
    task = {
        "id": 7,
        "data": {"image": "/data/local-files/?d=a.png"},
        "annotations": [{"id": 1, "result": [result]}],
    }
    (tmp_path / "export.json").write_text(json.dumps([task]))
    [item] = read_annotations(tmp_path / "export.json")
    assert item.boxes == (Box("Tree", 20, 20, 100, 80, ((20, 20), (100, 20), (100, 80))),)


def test_yolo_segment_lines_round_trip_and_malformed_ones_are_refused() -> None:
    box = polygon_box("tree", [(3, 4), (30, 8), (12, 40)])
    line = yolo_line(box, 0, 64, 48, "segment")
    assert line.split()[0] == "0" and len(line.split()) == 7
    back = parse_yolo_line(line, ["tree"], 64, 48)
    np.testing.assert_allclose(back.polygon, box.polygon, atol=64 * 1e-6)
    assert back.label == "tree"
    with pytest.raises(ValueError, match="at least 3 points"):
        parse_yolo_line("0 0.1 0.2 0.3 0.4 0.5 0.6 0.7", ["tree"], 64, 48)
    with pytest.raises(ValueError, match="no outline"):
        yolo_line(Box("tree", 0, 0, 1, 1), 0, 64, 48, "segment")


def test_outlines_are_cut_exactly_by_a_window() -> None:
    square = [(0.0, 0.0), (10.0, 0.0), (10.0, 10.0), (0.0, 10.0)]
    assert set(clip_polygon(square, 5, -5, 20, 5)) == {(5, 0), (10, 0), (10, 5), (5, 5)}
    diamond = [(5.0, 0.0), (10.0, 5.0), (5.0, 10.0), (0.0, 5.0)]
    cut = clip_polygon(diamond, 0, 0, 5, 10)  # the left half
    assert shoelace(cut) == pytest.approx(shoelace(diamond) / 2)
    box = polygon_box("tree", diamond).clip(0, 0, 5, 10)
    assert (box.x0, box.y0, box.x1, box.y1) == (0, 0, 5, 10)
    gone = polygon_box("tree", diamond).clip(20, 20, 30, 30)
    assert gone.area == 0 and gone.polygon == ()


def seg_params(tmp_path: Path, **seeds) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["task"] = "segment"
    params["train"]["model"] = "yolov8n-seg.yaml"
    params["seeds"].update(source=str(FIXTURE / "annotations.json"), **seeds)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path / "params.yaml"


def test_seeds_write_the_outlines_cut_by_each_tile(tmp_path: Path) -> None:
    params = load_params(seg_params(tmp_path, tile_size=64, tile_overlap=0, split_by="tile"))
    items = read_annotations(params.seeds.source)
    run_seeds(items, params.seeds, params.classes, tmp_path / "real", params.task)
    labels = sorted((tmp_path / "real" / "labels").rglob("*.txt"))
    assert len(labels) == 4 * len(items)  # every 128 px crop is 2 x 2 tiles of 64 px
    written = {
        label.stem: [parse_yolo_line(x, ["tree"], 64, 64) for x in label.read_text().splitlines()]
        for label in labels
    }
    assert all(len(box.polygon) >= 3 for boxes in written.values() for box in boxes)
    # One tile by hand: its outlines are the crop's outlines cut to the tile and moved to its origin.
    crop = next(item for item in items if item.image.stem == "OSBS_029_crop0")
    tile = written["OSBS_029_crop0_x64_y0"]
    expected = [clip_polygon(box.polygon, 64, 0, 128, 64) for box in crop.boxes]
    expected = [[(x - 64, y) for x, y in outline] for outline in expected if len(outline) >= 3]
    kept = [outline for outline in expected if shoelace(outline) > 0]
    assert len(tile) <= len(kept) and tile
    for box in tile:
        assert any(
            np.allclose(box.polygon, outline, atol=64 * 1e-6)
            for outline in kept
            if len(outline) == len(box.polygon)
        )


def test_segment_task_refuses_seeds_with_boxes_only(neon_seeds: Path, tmp_path: Path) -> None:
    params = load_params(seg_params(tmp_path))
    items = read_annotations(neon_seeds)
    with pytest.raises(GenfusionError, match=r"\.xml: a 'Tree' object in .* has a box but no outline"):
        run_seeds(items, params.seeds, params.classes, tmp_path / "real", params.task)
    assert not (tmp_path / "real").exists()


def test_segment_task_needs_a_segmentation_model(tmp_path: Path) -> None:
    path = seg_params(tmp_path)
    text = path.read_text().replace("yolov8n-seg.yaml", "yolov8n.yaml")
    path.write_text(text)
    with pytest.raises(
        GenfusionError, match="task is segment but train.model 'yolov8n.yaml' is a detection model"
    ):
        load_params(path)


def test_attention_outlines_hold_the_class_pixels_and_none_of_the_ignore_band(tmp_path: Path) -> None:
    scores = np.zeros((1, 40, 40))
    scores[0, 8:30, 6:20] = 0.9  # an L-shaped crown ...
    scores[0, 20:30, 20:34] = 0.9
    scores[0, 6:8, 6:34] = 0.5  # ... under an uncertain band: ignore
    mask = prelabel.scores_to_mask(scores, low=0.4, high=0.6)
    [box], _ = prelabel.mask_to_boxes(mask, scores, ["tree"], min_area=16)
    outline = np.array(box.polygon, dtype=np.float32).reshape(-1, 1, 2)
    ys, xs = np.nonzero(mask == 1)
    inside = [cv2.pointPolygonTest(outline, (x + 0.5, y + 0.5), False) for x, y in zip(xs, ys, strict=True)]
    assert min(inside) >= 0  # every class pixel centre is inside or on the outline
    ys, xs = np.nonzero(mask == prelabel.IGNORE)
    assert (
        max(cv2.pointPolygonTest(outline, (x + 0.5, y + 0.5), False) for x, y in zip(xs, ys, strict=True)) < 0
    )
    # The written label is that outline, normalised.
    found = prelabel.Labels((box,), (0.9,), mask)
    prelabel.write_labels(tmp_path / "pre", ["a"], [found], [(40, 40)], ["tree"], "attention", "segment")
    [line] = (tmp_path / "pre" / "labels" / "a.txt").read_text().splitlines()
    np.testing.assert_allclose(parse_yolo_line(line, ["tree"], 40, 40).polygon, box.polygon, atol=40 * 1e-6)


def test_label_quality_scores_outlines_by_mask_iou(tmp_path: Path) -> None:
    (tmp_path / "generated" / "images").mkdir(parents=True)
    Image.new("RGB", (20, 20)).save(tmp_path / "generated" / "images" / "a.png")
    # Outlines through the centres of border pixels: 10 x 10 px automatic, 10 x 5 px by people.
    auto = polygon_box("tree", [(0.5, 0.5), (9.5, 0.5), (9.5, 9.5), (0.5, 9.5)])
    people = polygon_box("tree", [(0.5, 0.5), (9.5, 0.5), (9.5, 4.5), (0.5, 4.5)])
    prelabel.write_labels(
        tmp_path / "pre",
        ["a"],
        [prelabel.Labels((auto,), (0.9,))],
        [(20, 20)],
        ["tree"],
        "detector",
        "segment",
    )
    (tmp_path / "people" / "labels").mkdir(parents=True)
    (tmp_path / "people" / "labels" / "a.txt").write_text(yolo_line(people, 0, 20, 20, "segment") + "\n")
    quality = label_quality.subject_quality(
        tmp_path / "pre", tmp_path / "people", tmp_path / "generated", ["tree"], "segment"
    )
    assert quality["mask_iou"] == pytest.approx(50 / 100)
    assert quality["true_positives"] == 0  # the boxes (outline bounds, 9 x 9 and 9 x 4 px) overlap 4/9 < 0.5
    detect = label_quality.subject_quality(
        tmp_path / "pre", tmp_path / "people", tmp_path / "generated", ["tree"]
    )
    assert "mask_iou" not in detect


@pytest.mark.integration
def test_dvc_repro_trains_and_scores_segmentation_models_on_real_and_attention_labels(tmp_path: Path) -> None:
    fixture = FIXTURE.relative_to(ROOT) / "annotations.json"
    split = {"train": 0.5, "val": 0.25, "test": 0.25}
    repo = project_repo(
        tmp_path,
        {
            "task": "segment",
            "seeds": {"source": fixture.as_posix(), "tile_size": 128, "split": split},
            "diffusion": {"resolution": 32, "pretrain_steps": 2, "pretrain_vae_steps": 2},
            "finetune": {"steps": 2, "num_class_images": 2},
            "generate": {"n": 4, "steps": 2},
            # Thresholds low enough that the barely trained model's maps give regions to outline.
            "prelabel": {"method": "attention", "low": 0.2, "high": 0.4, "min_box_area": 4},
            "datasets": {"variants": ["synthetic"]},
            "train": {
                "model": "yolov8n-seg.yaml",
                "variants": ["real", "synthetic"],
                "init_from": [],
                "seeds": [0],
                "epochs": 2,
                "imgsz": 64,
                "batch": 4,
                "workers": 0,
            },
        },
    )
    run(repo, "dvc", "repro", "report")
    labels = [
        *(repo / "data/real/labels").rglob("*.txt"),
        *(repo / "data/datasets/synthetic/labels").rglob("*.txt"),
    ]
    lines = [line for label in labels for line in label.read_text().splitlines()]
    assert lines and all(len(line.split()) > 5 for line in lines)
    masks = sorted((repo / "data/prelabels/canopy/masks").glob("*.png"))
    assert len(masks) == 4
    synthetic = [
        (repo / "data/datasets/synthetic/labels/train" / f"{mask.stem}.txt").read_text() for mask in masks
    ]
    assert any(synthetic), "the attention masks gave no outline at all"
    summary = json.loads((repo / "metrics/summary.json").read_text())
    for variant in ("real", "synthetic"):
        scores = json.loads((repo / f"metrics/eval/{variant}-0.json").read_text())
        # Boxes on the whole scene; masks on the test tiles (the tile-level protocol).
        for key in ("map", "map50", "tile_mask_map", "tile_mask_map50", "tile_mask_map75"):
            assert 0 <= scores[key] <= 1, (variant, key)
        assert summary["test"][variant]["yolov8n-seg"]["tile_mask_map50_mean"] == scores["tile_mask_map50"]
    assert "tile mask AP50" in (repo / "reports/summary.md").read_text()
