"""The quality filter (`filter@<set>`) on real components: composites of real NEON tiles, a YOLO
detector really trained on those tiles, the offline embedding, a tiny random CLIP; and its
pure core (scores, rank percentiles, the choice) against hand counts.

What a detector trained for seconds finds differs with its seed and with the CPU's floating
point, so the tests on the trained detector assert only what holds for any detector; how the
filter treats what a detector finds is tested with detections known by construction."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from process_state import process_state_kept

from genfusion.boxes import Box
from genfusion.errors import GenfusionError
from genfusion.formats import read_annotations
from genfusion.layout import DATASET_YAML, MANIFEST, Sources
from genfusion.manifest import write_manifest
from genfusion.params import FilterParams, PrelabelParams, parse_params
from genfusion.placement import load_tiles
from genfusion.stages import quality_filter
from genfusion.stages.composite import COMPOSITE_COLUMNS, make_composites
from genfusion.stages.datasets import build_dataset
from genfusion.stages.seeds import run_seeds

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["tree"]
TILE = 128  # real tiles this small keep the crowns (about 38 px) large at imgsz 64
IMGSZ = 64
# The detector is trained a few seconds, without augmentation, on the very tiles the composites
# are made of, and run at a low confidence; what it finds is its seed's and the CPU's.
DETECTOR = PrelabelParams(conf=0.05)
BACKGROUNDS = 4  # composites: one on each of the first real train tiles with objects


def params_data(**filter_section) -> dict:
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["seeds"].update(tile_size=TILE, tile_overlap=0)
    data["train"].update(
        epochs=5, imgsz=IMGSZ, batch=4, nbs=4, workers=0, device="cpu", warmup_epochs=0,
        mosaic=0.0, close_mosaic=0, fliplr=0.0, flipud=0.0, scale=0.0, hsv_h=0.0, hsv_s=0.0, hsv_v=0.0,
    )  # fmt: skip
    data["prelabel"] = DETECTOR.model_dump(mode="json")
    data["filter"] = {"keep": 0.5} | filter_section
    return data


@pytest.fixture(scope="module")
def project(neon_seeds: Path, train_seed: int, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Real tiles, a composite set of them with one image broken on purpose, and the real
    detector trained on the tiles."""
    from genfusion.stages.train import train_detector

    root = tmp_path_factory.mktemp("filter")
    params = parse_params(params_data())
    real = root / "data/real"
    run_seeds(read_annotations(neon_seeds), params.seeds, params.classes, real)
    build_dataset("real", Sources(real=root / "data/real"), root / "data/datasets/real")
    with pytest.MonkeyPatch.context() as patch, process_state_kept():
        patch.chdir(root)  # dvclive looks for a DVC repo from the working folder: not the project's
        best = train_detector(
            root / "data/datasets/real" / DATASET_YAML, root / "models/real-0", root / "live/real-0",
            params.train, seed=train_seed,
        )  # fmt: skip
    # The last epoch's weights: after a few epochs the val mAP that picks best.pt is noise, and the
    # last epoch is the one that has learnt most.
    weights = best.with_name("last.pt")

    # Composites on the first few tiles with objects (one each), as the composite stage makes them.
    small = root / "small"
    chosen = [
        image
        for image in sorted((real / "images/train").glob("*.png"))
        if (real / "labels/train" / f"{image.stem}.txt").read_text().strip()
    ][:BACKGROUNDS]
    for image in chosen:
        for sub, name in (("images", image.name), ("labels", f"{image.stem}.txt")):
            (small / sub / "train").mkdir(parents=True, exist_ok=True)
            shutil.copy2(real / sub / "train" / name, small / sub / "train" / name)
    composites = root / "data/composites"
    rows = make_composites(
        load_tiles(small, NAMES), NAMES, params.composite.model_copy(update={"per_image": 1}), composites
    )
    # The broken twin of the first composite: flat grey pixels, the same boxes.
    intact = rows[0]
    broken = {key: "" for key in COMPOSITE_COLUMNS} | {
        "file": intact["file"].replace(".png", "_broken.png"),
        "label": intact["label"].replace(".txt", "_broken.txt"),
    }
    with Image.open(composites / intact["file"]) as image:
        size = image.size
    Image.new("RGB", size, (128, 128, 128)).save(composites / broken["file"])
    shutil.copyfile(composites / intact["label"], composites / broken["label"])
    write_manifest(composites / MANIFEST, COMPOSITE_COLUMNS, [*rows, broken])
    return {
        "root": root,
        "params": params,
        "real": real,
        "weights": weights,
        "set": composites,
        "intact": intact["file"],
        "broken": broken["file"],
    }


def run_filter(project: dict, out: Path, **settings) -> dict:
    p = project["params"]
    return quality_filter.filter_set(
        project["set"], "composite", project["real"], project["weights"],
        FilterParams(**({"keep": 0.5} | settings)), p.classes, p.prelabel, p.train.imgsz, p.train.device,
        p.diffusion.class_prompt, out,
    )  # fmt: skip


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def filtered(project: dict) -> Path:
    """The stage's entry point on the set, keep 0.5."""
    out = project["root"] / "data/filtered/composites"
    quality_filter.main(
        project["params"],
        name="composite",
        set_dir=project["set"],
        real=project["real"],
        weights=project["weights"],
        out=out,
    )
    return out


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CLIP checkpoint with random weights and small text and vision towers, saved with its
    processor (the byte-level CLIP tokenizer, an image processor for 32 px) as a real one is."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from genfusion.diffusion.pipelines import byte_level_tokenizer

    folder = tmp_path_factory.mktemp("clip")
    tokenizer = byte_level_tokenizer(77)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "image_size": 32, "patch_size": 8,
        },
        projection_dim=16,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        CLIPModel(config).eval().save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


# The pure core ---------------------------------------------------------------------------------


def test_agreement_realism_and_percentiles_by_hand() -> None:
    known = [Box("tree", 0, 0, 10, 10), Box("tree", 20, 20, 30, 30)]
    # The first object is found exactly; the second half-covered (IoU 50 / 100); a box of another
    # class on it counts for nothing.
    found = [Box("tree", 0, 0, 10, 10), Box("tree", 20, 25, 30, 30), Box("dead", 20, 20, 30, 30)]
    assert quality_filter.agreement(known, found) == pytest.approx((1.0 + 0.5) / 2)
    assert quality_filter.agreement(known, []) == 0.0
    assert quality_filter.agreement([], []) == 1.0  # nothing known, nothing found
    assert quality_filter.agreement([], found) == 0.0

    real = np.array([[0.0, 0.0], [3.0, 4.0]])
    assert quality_filter.realism(np.array([3.0, 0.0]), real) == -3.0
    assert quality_filter.realism(np.array([3.0, 4.0]), real) == 0.0

    # Ranks 1, 2.5, 2.5, 4 (ties averaged) over 4 values -> (rank - 1) / 3.
    np.testing.assert_allclose(quality_filter.percentiles([0.1, 0.5, 0.5, 0.9]), [0, 0.5, 0.5, 1])
    np.testing.assert_allclose(quality_filter.percentiles([7.0, 7.0, 7.0]), [0.5, 0.5, 0.5])
    np.testing.assert_allclose(quality_filter.percentiles([7.0]), [0.5])
    # Many values with ties: the definition, every pair compared (the stage counts by sorting).
    values = np.round(np.random.default_rng(0).normal(size=500), 1)
    pairs = (values[None, :] < values[:, None]).sum(1) + ((values[None, :] == values[:, None]).sum(1) + 1) / 2
    np.testing.assert_array_equal(quality_filter.percentiles(values), (pairs - 1) / (len(values) - 1))


def test_choose_orders_by_mean_percentile_then_file_and_keeps_the_share() -> None:
    # Percentiles over four images: agreement a 0, d 1/3, c 2/3, b 1; realism d 0, b 1/3, c 2/3,
    # a 1. Combined: b 2/3, c 2/3 (tied: by file name), a 1/2, d 1/6.
    scores = [
        quality_filter.Scores("d.png", "d.txt", agreement=0.2, realism=-2.0),
        quality_filter.Scores("c.png", "c.txt", agreement=0.5, realism=-0.2),
        quality_filter.Scores("b.png", "b.txt", agreement=0.9, realism=-0.3),
        quality_filter.Scores("a.png", "a.txt", agreement=0.0, realism=-0.1),
    ]
    chosen = quality_filter.choose(scores, keep=0.5)
    assert [c.scores.file for c in chosen] == ["b.png", "c.png", "a.png", "d.png"]
    assert [c.score for c in chosen] == [0.666667, 0.666667, 0.5, 0.166667]
    assert [c.rank for c in chosen] == [1, 2, 3, 4]
    assert [c.kept for c in chosen] == [True, True, False, False]
    # round(keep x n), half to even, at least one.
    assert [quality_filter.kept_count(k, 4) for k in (0.01, 0.3, 0.375, 0.625, 1.0)] == [1, 1, 2, 2, 4]
    assert sum(c.kept for c in quality_filter.choose(scores, keep=0.01)) == 1
    # A third score moves the ranking: clip percentiles d 0, c 1/3, b 2/3, a 1 make a and b tie
    # at 2/3 ahead of c (5/9).
    with_clip = [
        quality_filter.Scores(s.file, s.label, s.agreement, s.realism, clip=c)
        for s, c in zip(scores, [0.0, 0.1, 0.2, 0.9], strict=True)
    ]
    assert [c.scores.file for c in quality_filter.choose(with_clip, keep=0.25)] == [
        "a.png",
        "b.png",
        "c.png",
        "d.png",
    ]
    with pytest.raises(ValueError, match="keep"):
        quality_filter.choose(scores, keep=0)


# The stage on real components -------------------------------------------------------------------


def expected_choice(rows: list[dict[str, str]], keep: float, columns: tuple[str, ...]) -> list[dict]:
    """Combined scores, ranks and kept flags recomputed from the manifest's own scores."""
    from scipy.stats import rankdata

    n = len(rows)
    per_score = [(rankdata([float(r[c]) for r in rows], method="average") - 1) / (n - 1) for c in columns]
    combined = [round(float(v), 6) for v in np.mean(per_score, axis=0)]
    order = sorted(range(n), key=lambda i: (-combined[i], rows[i]["file"]))
    count = max(1, round(keep * n))
    return [
        {"file": rows[i]["file"], "score": combined[i], "rank": rank, "kept": rank <= count}
        for rank, i in enumerate(order, start=1)
    ]


@pytest.mark.integration
def test_ranks_and_kept_share_follow_the_scores(project: dict, filtered: Path) -> None:
    rows = read_rows(filtered / MANIFEST)
    listed = read_rows(project["set"] / MANIFEST)
    assert list(rows[0]) == list(quality_filter.COLUMNS)
    assert sorted((r["file"], r["label"]) for r in rows) == sorted((r["file"], r["label"]) for r in listed)
    assert all(r["clip"] == "" for r in rows)  # no CLIP configured
    assert len({r["realism"] for r in rows}) > 1  # the pixels differ, whatever the detector finds
    # Each agreement is the one of the boxes the real detector finds on that image, as it finds them.
    from genfusion.detection import detect

    p = project["params"]
    items = quality_filter.set_items(project["set"], "composite")
    images = [item.image for item in items]
    found = detect(project["weights"], images, p.classes, p.prelabel, p.train.imgsz, p.train.device)
    known = quality_filter.read_known(items, p.classes)
    by_file = {r["file"]: float(r["agreement"]) for r in rows}
    for item, k, f in zip(items, known, found, strict=True):
        assert by_file[item.file] == round(quality_filter.agreement(k, f.boxes), quality_filter.DIGITS)
    expected = expected_choice(rows, 0.5, ("agreement", "realism"))
    assert [
        {"file": r["file"], "score": float(r["score"]), "rank": int(r["rank"]), "kept": r["kept"] == "true"}
        for r in rows
    ] == expected
    assert sum(r["kept"] == "true" for r in rows) == round(0.5 * len(rows))

    summary = json.loads((filtered / quality_filter.SUMMARY).read_text())
    assert (summary["n"], summary["kept"], summary["keep"]) == (len(rows), round(0.5 * len(rows)), 0.5)
    for group, flag in (("kept", "true"), ("dropped", "false")):
        values = [float(r["agreement"]) for r in rows if r["kept"] == flag]
        assert summary["mean"][group]["agreement"] == pytest.approx(np.mean(values), abs=1e-6)
        assert summary["mean"][group]["clip"] is None


@pytest.mark.integration
def test_a_broken_image_ranks_last_and_is_dropped_whatever_the_detector_finds(project: dict) -> None:
    """The set's real images and labels, scored with detections known by construction: a detector
    that finds every known object, one that finds nothing (as a tiny one can), one that finds the
    objects everywhere but on the flat image. The flat image is the least real in every case, so it
    ranks last and is dropped; only where the detector misses its objects does its agreement fall."""
    items = quality_filter.set_items(project["set"], "composite")
    known = quality_filter.read_known(items, NAMES)
    reference = quality_filter.real_embeddings(project["real"])
    files = [item.file for item in items]
    broken, intact = files.index(project["broken"]), files.index(project["intact"])
    assert known[broken] == known[intact] and known[broken], "the twins carry the same, non-empty labels"
    # Each detector's boxes on every image, and the agreements they give the (broken, intact) twins.
    detectors = {
        "finds every object": (known, (1.0, 1.0)),
        "finds nothing": ([[] for _ in items], (0.0, 0.0)),
        "misses the broken image": ([[] if i == broken else k for i, k in enumerate(known)], (0.0, 1.0)),
    }
    for detector, (found, agreements) in detectors.items():
        scored = quality_filter.score_items(items, known, found, reference)
        assert scored[broken].realism < min(s.realism for i, s in enumerate(scored) if i != broken), detector
        assert (scored[broken].agreement, scored[intact].agreement) == agreements, detector
        ranked = quality_filter.choose(scored, keep=0.5)
        assert ranked[-1].scores.file == project["broken"] and not ranked[-1].kept, detector


@pytest.mark.integration
def test_the_flat_image_is_the_least_real_with_the_trained_detector(project: dict, filtered: Path) -> None:
    """End to end: realism does not depend on the detector, so the flat twin scores below its intact
    twin there, whatever a detector trained for seconds finds."""
    rows = {r["file"]: r for r in read_rows(filtered / MANIFEST)}
    intact, broken = rows[project["intact"]], rows[project["broken"]]
    assert float(broken["realism"]) < float(intact["realism"])
    assert float(broken["realism"]) == min(float(r["realism"]) for r in rows.values())


@pytest.mark.integration
def test_two_runs_write_identical_files(project: dict, filtered: Path, tmp_path: Path) -> None:
    run_filter(project, tmp_path / "again")
    assert files(tmp_path / "again") == files(filtered)
    assert sorted(files(filtered)) == [MANIFEST, quality_filter.SUMMARY]


@pytest.mark.integration
def test_clip_fills_its_column_and_changes_the_combined_score(
    project: dict, filtered: Path, tiny_clip: Path, tmp_path: Path
) -> None:
    summary = run_filter(project, tmp_path / "clip", clip=str(tiny_clip))
    rows = read_rows(tmp_path / "clip" / MANIFEST)
    clip = [float(r["clip"]) for r in rows]
    assert all(-1 <= c <= 1 for c in clip) and len(set(clip)) > 1
    assert summary["clip"] is True and summary["mean"]["kept"]["clip"] is not None
    expected = expected_choice(rows, 0.5, ("agreement", "realism", "clip"))
    assert [(r["file"], float(r["score"]), int(r["rank"])) for r in rows] == [
        (e["file"], e["score"], e["rank"]) for e in expected
    ]
    without = {r["file"]: (r["agreement"], r["realism"], r["score"]) for r in read_rows(filtered / MANIFEST)}
    assert {r["file"]: (r["agreement"], r["realism"]) for r in rows} == {f: v[:2] for f, v in without.items()}
    assert {r["file"]: r["score"] for r in rows} != {f: v[2] for f, v in without.items()}


@pytest.mark.integration
def test_bad_input_is_an_error_naming_it_and_writes_nothing(
    project: dict, filtered: Path, tmp_path: Path
) -> None:
    for keep in (0, 1.5, -0.2):
        with pytest.raises(GenfusionError, match=r"filter\.keep: Input should be"):
            parse_params(params_data(keep=keep))
    assert parse_params(params_data(keep=1)).filter.keep == 1

    # An earlier output stays as it was; a fresh one is not created.
    previous = tmp_path / "previous"
    shutil.copytree(filtered, previous)
    before = files(previous)
    fresh = tmp_path / "fresh"

    empty_set = tmp_path / "composites"
    (empty_set / "images").mkdir(parents=True)
    no_column = tmp_path / "variations"
    no_column.mkdir()
    (no_column / MANIFEST).write_text("file,source\nimages/a.png,x\n")
    broken_clip = tmp_path / "not-a-clip"
    broken_clip.mkdir()
    (broken_clip / "config.json").write_text("{}")
    p = project["params"]
    cases = [
        ({"set_dir": empty_set}, re.escape(f"{empty_set / MANIFEST}: missing; run `dvc repro composite`")),
        ({"set_dir": no_column}, "no label column"),
        ({"weights": tmp_path / "none.pt"}, r"none\.pt: the real detector's weights are missing.*train@real"),
        ({"settings": FilterParams(keep=0.5, clip=str(tmp_path / "nowhere"))}, r"filter\.clip: .*nowhere"),
        (
            {"settings": FilterParams(keep=0.5, clip=str(broken_clip))},
            r"filter\.clip: .*not-a-clip: cannot load",
        ),
    ]
    for change, message in cases:
        for out in (previous, fresh):
            arguments = {
                "set_dir": project["set"], "stage": "composite", "real_dir": project["real"],
                "weights": project["weights"],
                "settings": FilterParams(keep=0.5), "names": p.classes, "prelabel_settings": p.prelabel,
                "imgsz": p.train.imgsz, "device": p.train.device, "class_prompt": p.diffusion.class_prompt,
                "out": out,
            } | change  # fmt: skip
            with pytest.raises(GenfusionError, match=message):
                quality_filter.filter_set(**arguments)
        assert files(previous) == before
        assert not fresh.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
