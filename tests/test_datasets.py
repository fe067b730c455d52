"""The datasets stage: which images and labels each variant trains on, as links YOLO can read."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from PIL import Image

from genfusion.errors import GenfusionError
from genfusion.layout import Sources
from genfusion.params import TrainParams
from genfusion.stages.datasets import GeneratedChoice, build_dataset
from genfusion.stages.train import variant_epochs


def png(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), colour).save(path)


def label(path: Path, *lines: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))


@pytest.fixture
def sources(tmp_path: Path) -> Sources:
    """Three real train tiles, one val and one test; two subjects of three generated images each;
    automatic labels for every generated image but b_00002, people's labels for a_00000 only;
    one variation per real tile."""
    folders = ("real", "generated", "prelabels", "annotations")
    src = Sources(**{name: tmp_path / name for name in folders}, sets={"variations": tmp_path / "variations"})
    for split, stems in {"train": ["t0", "t1", "t2"], "val": ["v0"], "test": ["s0"]}.items():
        for k, stem in enumerate(stems):
            png(src.real / "images" / split / f"{stem}.png", (k, 0, 0))
            label(src.real / "labels" / split / f"{stem}.txt", f"0 0.5 0.5 0.{k + 1} 0.2")
    (src.real / "dataset.yaml").write_text(yaml.safe_dump({"names": {0: "tree"}}))
    for subject in ("a", "b"):
        for i in range(3):
            png(src.generated / subject / "images" / f"{subject}_{i:05d}.png", (0, i, 0))
            if (subject, i) != ("b", 2):
                label(
                    src.prelabels / subject / "labels" / f"{subject}_{i:05d}.txt", f"0 0.4 0.4 0.1 0.{i + 1}"
                )
    label(src.annotations / "a" / "labels" / "a_00000.txt", "0 0.1 0.1 0.05 0.05", "0 0.9 0.9 0.05 0.05")
    rows = []
    for stem in ("t0", "t1", "t2"):
        png(src.sets["variations"] / "images" / f"{stem}_v0.png", (0, 0, 9))
        (src.sets["variations"] / "labels").mkdir(parents=True, exist_ok=True)
        (src.sets["variations"] / "labels" / f"{stem}_v0.txt").write_bytes(
            (src.real / "labels" / "train" / f"{stem}.txt").read_bytes()
        )
        rows.append({"file": f"images/{stem}_v0.png", "label": f"labels/{stem}_v0.txt"})
    with (src.sets["variations"] / "manifest.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return src


def train_set(out: Path) -> dict[str, tuple[Path, str]]:
    """{image name: (the file its link resolves to, its label text)} of a written dataset."""
    images = sorted((out / "images" / "train").iterdir())
    assert all(image.is_symlink() and not os.path.isabs(os.readlink(image)) for image in images)
    return {
        image.name: (image.resolve(), (out / "labels" / "train" / f"{image.stem}.txt").read_text())
        for image in images
    }


def build(variant: str, sources: Sources, out: Path, label_source: str = "auto", ratio: float = 1.0) -> dict:
    return build_dataset(variant, sources, out, GeneratedChoice(["a", "b"], label_source, ratio))


def test_real_links_every_train_tile_with_its_labels_and_points_val_test_at_the_real_splits(
    sources: Sources, tmp_path: Path
) -> None:
    out = tmp_path / "datasets" / "real"
    counts = build("real", sources, out)
    files = train_set(out)
    assert sorted(files) == ["t0.png", "t1.png", "t2.png"]
    for name, (target, text) in files.items():
        stem = Path(name).stem
        assert target == (sources.real / "images" / "train" / name).resolve()
        assert text == (sources.real / "labels" / "train" / f"{stem}.txt").read_text()
    spec = yaml.safe_load((out / "dataset.yaml").read_text())
    assert (out / spec["val"]).resolve() == (sources.real / "images" / "val").resolve()
    assert (out / spec["test"]).resolve() == (sources.real / "images" / "test").resolve()
    assert spec["names"] == {0: "tree"}
    assert counts == json.loads((out / "counts.json").read_text())
    assert (counts["real_images"], counts["synthetic_images"], counts["train_boxes"]) == (3, 0, 3)


def test_ultralytics_reads_the_linked_images_and_their_labels(sources: Sources, tmp_path: Path) -> None:
    from ultralytics.data.utils import check_det_dataset, img2label_paths

    out = tmp_path / "datasets" / "variations"
    build("variations", sources, out)
    spec = check_det_dataset(str(out / "dataset.yaml"))
    images = sorted(str(p) for p in Path(spec["train"]).iterdir())
    assert len(images) == 6
    assert all(Path(p).is_file() for p in img2label_paths(images))
    assert Path(spec["test"]).resolve() == (sources.real / "images" / "test").resolve()


def test_variations_add_every_variation_with_its_source_boxes(sources: Sources, tmp_path: Path) -> None:
    out = tmp_path / "variations"
    counts = build("variations", sources, out)
    files = train_set(out)
    assert sorted(files) == ["t0.png", "t0_v0.png", "t1.png", "t1_v0.png", "t2.png", "t2_v0.png"]
    for stem in ("t0", "t1", "t2"):
        assert files[f"{stem}_v0.png"][1] == files[f"{stem}.png"][1]
    assert (counts["real_images"], counts["synthetic_images"], counts["train_images"]) == (3, 3, 6)


@pytest.mark.parametrize(
    ("label_source", "expected_a0", "left_out"),
    [
        ("auto", "0 0.4 0.4 0.1 0.1\n", 1),
        ("manual", "0 0.1 0.1 0.05 0.05\n0 0.9 0.9 0.05 0.05\n", 5),
        ("manual_else_auto", "0 0.1 0.1 0.05 0.05\n0 0.9 0.9 0.05 0.05\n", 1),
    ],
)
def test_synthetic_takes_labels_from_the_chosen_source_and_leaves_out_unlabelled_images(
    sources: Sources, tmp_path: Path, label_source: str, expected_a0: str, left_out: int
) -> None:
    out = tmp_path / label_source
    counts = build("synthetic", sources, out, label_source)
    files = train_set(out)
    assert files["a_00000.png"] == ((sources.generated / "a/images/a_00000.png").resolve(), expected_a0)
    assert counts["synthetic_without_label"] == left_out
    assert counts["synthetic_images"] == len(files) == 6 - left_out
    assert counts["real_images"] == 0
    if label_source != "manual":
        assert files["b_00001.png"][1] == "0 0.4 0.4 0.1 0.2\n"
        assert "b_00002.png" not in files


def test_mixed_adds_ratio_times_real_synthetic_images_drawn_evenly_from_the_subjects(
    sources: Sources, tmp_path: Path
) -> None:
    counts = build("mixed", sources, tmp_path / "mixed", ratio=1.0)
    assert sorted(train_set(tmp_path / "mixed")) == [
        "a_00000.png", "a_00001.png", "b_00000.png", "t0.png", "t1.png", "t2.png",
    ]  # fmt: skip
    assert (counts["real_images"], counts["synthetic_images"]) == (3, 3)
    with pytest.raises(GenfusionError, match=r"datasets.mixed_ratio: 2 x 3 real images needs 6 .* 5 exist"):
        build("mixed", sources, tmp_path / "too-many", ratio=2.0)
    assert not (tmp_path / "too-many").exists()


def test_no_label_at_all_says_how_to_get_labels(sources: Sources, tmp_path: Path) -> None:
    unlabelled = replace(sources, prelabels=tmp_path / "none", annotations=tmp_path / "none")
    with pytest.raises(
        GenfusionError, match="datasets@synthetic: 6 generated images have no label.*prelabel"
    ):
        build("synthetic", unlabelled, tmp_path / "x")
    with pytest.raises(GenfusionError, match="needs 3 labelled synthetic images, and 0 exist; 6 generated"):
        build("mixed", unlabelled, tmp_path / "x")


def test_unknown_variant_and_missing_generated_images_are_named(sources: Sources, tmp_path: Path) -> None:
    with pytest.raises(GenfusionError, match="unknown variant 'both'"):
        build("both", sources, tmp_path / "x")
    with pytest.raises(GenfusionError, match=r"generated/c/images: no generated images; .*generate@c"):
        build_dataset("synthetic", sources, tmp_path / "x", GeneratedChoice(["a", "c"], "auto", 1.0))


def test_real_needs_the_real_tiles_only_and_a_variant_names_the_folder_it_lacks(
    sources: Sources, tmp_path: Path
) -> None:
    only_real = Sources(real=sources.real)
    assert build("real", only_real, tmp_path / "out" / "real")["train_images"] == 3
    with pytest.raises(
        GenfusionError,
        match=r"^datasets@variations: needs the variations set's folder; pass --set variations=FOLDER$",
    ):
        build("variations", only_real, tmp_path / "out" / "variations")
    with pytest.raises(GenfusionError, match=r"^datasets: needs the generated folder; pass --generated$"):
        build_dataset("synthetic", only_real, tmp_path / "x", GeneratedChoice(["a"], "auto", 1.0))
    assert not (tmp_path / "out" / "variations").exists()


def test_same_steps_scales_epochs_to_the_real_splits_image_count() -> None:
    counts = {"real_train_split": 20, "train_images": 60}
    assert variant_epochs(TrainParams(epochs=150), counts) == 50
    assert variant_epochs(TrainParams(epochs=150, same_steps=False), counts) == 150
    assert variant_epochs(TrainParams(epochs=2), counts) == 1
    assert variant_epochs(TrainParams(epochs=150), {"real_train_split": 20, "train_images": 20}) == 150
