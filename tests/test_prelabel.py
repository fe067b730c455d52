"""Automatic labels: attention capture on the tiny model, masks to boxes, the prelabel and
label_quality stages, and the detector pre-labeller."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from project import generate_canopy

from genfusion.boxes import Box
from genfusion.diffusion.attention import capture_attention, class_prompt, class_token_positions
from genfusion.diffusion.pipelines import build_tiny_pipeline, use_scheduler
from genfusion.errors import GenfusionError
from genfusion.formats.yolo import parse_yolo_line, yolo_line
from genfusion.manifest import write_manifest
from genfusion.params import PrelabelParams, load_params
from genfusion.stages import label_quality, prelabel
from genfusion.stages.base_model import save_builtin

TORCH_THREADS = 1  # this module's torch threads (conftest.module_state): a worker's one core of CI's two
ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["tree", "dead tree"]
# At 32 px the tiny model's attention maps are 8 x 8 cells.
CAPTURE = PrelabelParams(map_size=8)


@pytest.fixture(scope="module")
def pipe():
    pipe = build_tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    use_scheduler(pipe, "ddim")
    return pipe


def call(pipe, prompts: list[str]) -> np.ndarray:
    generators = [torch.Generator().manual_seed(3 + i) for i in range(len(prompts))]
    images = pipe(
        prompts, height=32, width=32, num_inference_steps=2, guidance_scale=2.0, generator=generators
    )
    return np.stack([np.asarray(image) for image in images.images])


def test_capture_records_each_class_word_over_all_its_tokens_and_keeps_the_images(pipe) -> None:
    prompts = [class_prompt(p, CLASSES) for p in ("an aerial photo of tree crowns", "tree crowns")]
    positions = [class_token_positions(pipe.tokenizer, p, CLASSES, "generate.prompts") for p in prompts]
    # The byte-level tokenizer splits every word: "tree" is 4 tokens, "dead tree" 8.
    assert [len(p) for p in positions[0]] == [4, 8]
    ids = pipe.tokenizer(prompts[0]).input_ids
    assert pipe.tokenizer.decode([ids[i] for i in positions[0][1]]).strip() == "dead tree"
    # The appended "tree", not the one in "tree crowns".
    assert positions[0][0][0] > positions[0][1][0]

    plain = call(pipe, prompts)
    with capture_attention(pipe, CAPTURE, positions, steps=2) as recorder:
        captured = call(pipe, prompts)
    assert np.array_equal(plain, captured)  # same bytes with capture as without
    assert all(type(p).__name__ != "CaptureProcessor" for p in pipe.unet.attn_processors.values())
    maps = recorder.maps()
    assert len(maps) == 2
    assert maps[0]["cross"].shape == (2, 8, 8) and maps[0]["self"].shape == (64, 64)
    assert maps[0]["cross"].dtype == np.float16
    np.testing.assert_allclose(maps[0]["self"].astype(np.float64).sum(axis=1), 1.0, atol=1e-2)
    assert not np.array_equal(maps[0]["cross"][0], maps[0]["cross"][1])
    assert not np.array_equal(maps[0]["cross"], maps[1]["cross"])


def test_a_map_size_no_layer_has_is_refused(pipe) -> None:
    positions = [class_token_positions(pipe.tokenizer, "trees; tree", ["tree"], "generate.prompts")]
    with capture_attention(pipe, PrelabelParams(map_size=12), positions, steps=2) as recorder:
        call(pipe, ["trees; tree"])
    with pytest.raises(GenfusionError, match=r"prelabel.map_size: 12, but .* \[8\]"):
        recorder.maps()
    with pytest.raises(GenfusionError, match="'oak' is not found"):
        class_token_positions(pipe.tokenizer, "trees", ["oak"], "generate.prompts[0]")


def test_masks_and_boxes_from_known_blobs() -> None:
    scores = np.zeros((2, 40, 50))
    scores[0, 5:15, 10:22] = 0.9  # a 12 x 10 crown of class 0
    scores[0, 30:33, 30:33] = 0.9  # 9 px: below min_box_area
    scores[1, 20:30, 35:45] = 0.5  # uncertain: ignore, no box
    scores[1, 22:26, 0:8] = 0.8  # class 1, 32 px
    mask = prelabel.scores_to_mask(scores, low=0.4, high=0.6)
    assert mask.dtype == np.uint8 and mask.shape == (40, 50)
    assert (mask[5:15, 10:22] == 1).all() and (mask[20:30, 35:45] == 255).all()
    assert (mask[22:26, 0:8] == 2).all() and mask[0, 0] == 0
    boxes, box_scores = prelabel.mask_to_boxes(mask, scores, ["tree", "dead"], min_area=16)
    assert [replace(box, polygon=()) for box in boxes] == [
        Box("tree", 10, 5, 22, 15),
        Box("dead", 0, 22, 8, 26),
    ]
    assert box_scores == [0.9, 0.8]
    # Outlines run through the centres of the border pixels.
    assert set(boxes[0].polygon) == {(10.5, 5.5), (21.5, 5.5), (21.5, 14.5), (10.5, 14.5)}
    assert set(boxes[1].polygon) == {(0.5, 22.5), (7.5, 22.5), (7.5, 25.5), (0.5, 25.5)}

    # Self-attention that spreads each cell to its neighbour: the refined map is smoother,
    # normalised to [0, 1]; exponent 0 leaves the map as it is (up to normalisation).
    cross = np.zeros((1, 2, 2))
    cross[0, 0, 0] = 2.0
    spread = np.array([[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    np.testing.assert_allclose(prelabel.refine(cross, spread, 0), [[[1, 0], [0, 0]]])
    np.testing.assert_allclose(prelabel.refine(cross, spread, 3), [[[1, 1], [0, 0]]])


def tiny_project(root: Path, n: int, prelabel_params: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["classes"] = ["tree"]
    params["diffusion"] = {"resolution": 32}
    params["generate"] = {"n": n, "batch": 2, "steps": 2, "seed": 1}
    params["train"].update(epochs=1, imgsz=32, batch=2, nbs=2, workers=0, close_mosaic=0, mosaic=0.0)
    params["prelabel"] = prelabel_params
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root / "params.yaml"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("base")
    save_builtin(build_tiny_pipeline(seed=0), folder)
    return folder


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_prelabel_stage_writes_one_label_file_and_mask_per_image(base_dir: Path, tmp_path: Path) -> None:
    params = tiny_project(
        tmp_path, 3, {"method": "attention", "min_box_area": 2}
    )  # map_size auto: 8 at 32 px
    generated, out = tmp_path / "generated", tmp_path / "prelabels"
    generate_canopy(params, base_dir, tmp_path, generated)
    rows = read_rows(generated / "manifest.csv")
    assert rows[0]["prompt"] == "an aerial photo of tree crowns; tree"  # the prompt actually used
    assert sorted(p.name for p in (generated / "attention").iterdir()) == [
        f"canopy_{i:05d}.npz" for i in range(3)
    ]
    first = (generated / "attention" / "canopy_00000.npz").read_bytes()
    generate_canopy(params, base_dir, tmp_path, tmp_path / "again")
    assert (tmp_path / "again" / "attention" / "canopy_00000.npz").read_bytes() == first

    prelabel.main(
        load_params(params), subject="canopy", generated=generated, weights=tmp_path / "no.pt", out=out
    )
    stems = [f"canopy_{i:05d}" for i in range(3)]
    assert sorted(p.stem for p in (out / "labels").iterdir()) == stems
    assert sorted(p.stem for p in (out / "masks").iterdir()) == stems
    manifest = read_rows(out / "manifest.csv")
    assert [row["method"] for row in manifest] == ["attention"] * 3
    for row, stem in zip(manifest, stems, strict=True):
        lines = (out / "labels" / f"{stem}.txt").read_text().splitlines()
        assert int(row["boxes"]) == len(lines) == len(json.loads(row["scores"]))
        for line in lines:
            box = parse_yolo_line(line, ["tree"], 32, 32)
            assert 0 <= box.x0 < box.x1 <= 32 and 0 <= box.y0 < box.y1 <= 32
        mask = np.asarray(Image.open(out / "masks" / f"{stem}.png"))
        assert mask.shape == (32, 32) and set(np.unique(mask)) <= {0, 1, 255}
    assert sum(int(row["boxes"]) for row in manifest) > 0

    # Images made without capture have no maps: the stage says how to get them.
    plain = tiny_project(tmp_path / "plain", 1, {"method": "detector"})
    generate_canopy(plain, base_dir, tmp_path, tmp_path / "plain-gen")
    assert not (tmp_path / "plain-gen" / "attention").exists()
    with pytest.raises(GenfusionError, match="no attention maps; .* rerun `dvc repro generate@canopy`"):
        prelabel.main(
            load_params(params),
            subject="canopy",
            generated=tmp_path / "plain-gen",
            weights=tmp_path / "no.pt",
            out=tmp_path / "p2",
        )


def write_image(path: Path, size: tuple[int, int] = (100, 100)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size).save(path)


def test_label_quality_matches_a_hand_count(tmp_path: Path) -> None:
    root = tmp_path
    for stem in ("canopy_00000", "canopy_00001", "canopy_00002"):
        write_image(root / "generated/canopy/images" / f"{stem}.png")

    def labels(folder: Path, stem: str, boxes: list[Box]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{stem}.txt").write_text("".join(yolo_line(b, 0, 100, 100) + "\n" for b in boxes))

    auto = root / "prelabels/canopy"
    people = root / "annotations/canopy/labels"
    # Image 0: one hit (IoU 0.9), one false box. People drew a second tree missed by the auto labels.
    labels(auto / "labels", "canopy_00000", [Box("tree", 0, 0, 10, 10), Box("tree", 50, 50, 60, 60)])
    labels(people, "canopy_00000", [Box("tree", 0, 0, 10, 9), Box("tree", 80, 80, 90, 90)])
    # Image 1: two auto boxes on one true tree: the higher-scored one takes it, the other is false.
    labels(auto / "labels", "canopy_00001", [Box("tree", 20, 20, 40, 40), Box("tree", 21, 21, 40, 40)])
    labels(people, "canopy_00001", [Box("tree", 20, 20, 40, 40)])
    # Image 2: nobody finished it; not counted.
    labels(auto / "labels", "canopy_00002", [Box("tree", 0, 0, 5, 5)])
    rows = [
        {"file": "labels/canopy_00000.txt", "method": "attention", "boxes": 2, "scores": "[0.9, 0.8]"},
        {"file": "labels/canopy_00001.txt", "method": "attention", "boxes": 2, "scores": "[0.5, 0.7]"},
        {"file": "labels/canopy_00002.txt", "method": "attention", "boxes": 1, "scores": "[0.9]"},
    ]
    write_manifest(auto / "manifest.csv", prelabel.PRELABEL_COLUMNS, rows)
    # A second subject nobody has labelled yet.

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["subjects"]["other"] = params["subjects"]["canopy"]
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    out = root / "labels.json"
    label_quality.main(
        load_params(root / "params.yaml"),
        prelabels=root / "prelabels",
        annotations=root / "annotations",
        generated=root / "generated",
        real=root,
        weights=root / "no.pt",
        out=out,
    )
    report = json.loads(out.read_text())
    # Hand count: 2 hits of 4 predictions, 2 of 3 true trees.
    assert report["subjects"]["canopy"] == {
        "annotated": 2,
        "precision": 2 / 4,
        "recall": 2 / 3,
        "predictions": 4,
        "truths": 3,
        "true_positives": 2,
    }
    assert report["subjects"]["other"] == {"annotated": 0, "note": "no people's labels yet"}
    assert "detector_on_real_val" not in report  # no detector trained

    auto_mask = np.array([[1, 1, 0, 255]], dtype=np.uint8)
    people_mask = np.array([[1, 0, 0, 1]], dtype=np.uint8)
    assert label_quality.mask_iou(auto_mask, people_mask, 1) == 0.5  # the ignored pixel is left out


def genfusion(root: Path, *args: str) -> None:
    """A stage through the command line, in its own process: YOLO training changes torch's
    global settings (deterministic algorithms), which would change later tests' images."""
    command = [
        sys.executable,
        "-c",
        "from genfusion.cli import main; main()",
        *args,
        "--params",
        "params.yaml",
    ]
    done = subprocess.run(command, cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.integration
def test_detector_prelabels_are_valid_yolo_files(neon_seeds: Path, base_dir: Path, tmp_path: Path) -> None:
    from genfusion.formats import read_annotations
    from genfusion.params import load_params
    from genfusion.stages.seeds import run_seeds

    params_path = tiny_project(tmp_path, 2, {"method": "detector", "conf": 0.0})
    params = load_params(params_path)
    run_seeds(read_annotations(neon_seeds), params.seeds, params.classes, tmp_path / "data/real")
    genfusion(tmp_path, "datasets", "real", "--real", "data/real", "--out", "data/datasets/real")
    genfusion(tmp_path, "train", "--data", "data/datasets/real", "--out", "det", "--live", "live")
    weights = tmp_path / "det/weights/best.pt"
    generate_canopy(params_path, base_dir, tmp_path, tmp_path / "generated/canopy")
    genfusion(
        tmp_path,
        "prelabel",
        "canopy",
        "--generated",
        "generated/canopy",
        "--out",
        "pl/canopy",
        "--weights",
        str(weights),
    )
    out = tmp_path / "pl/canopy"
    assert sorted(p.name for p in (out / "labels").iterdir()) == ["canopy_00000.txt", "canopy_00001.txt"]
    assert not (out / "masks").exists()
    lines = 0
    for path in (out / "labels").iterdir():
        for line in path.read_text().splitlines():
            parse_yolo_line(line, ["tree"], 32, 32)  # raises on a malformed line
            lines += 1
    manifest = read_rows(out / "manifest.csv")
    assert {row["method"] for row in manifest} == {"detector"}
    assert sum(int(row["boxes"]) for row in manifest) == lines

    paths = ["--prelabels", "pl", "--annotations", "ann", "--generated", "generated", "--real", "data/real"]
    genfusion(tmp_path, "label-quality", *paths, "--weights", str(weights), "--out", "labels.json")
    report = json.loads((tmp_path / "labels.json").read_text())
    assert report["subjects"]["canopy"] == {"annotated": 0, "note": "no people's labels yet"}
    detector = report["detector_on_real_val"]
    assert detector["images"] == len(list((tmp_path / "data/real/images/val").glob("*.png"))) > 0
    assert 0 <= detector["precision"] <= 1 and 0 <= detector["recall"] <= 1
