"""variations for real on the tiny model: boxes carried over byte for byte, source sizes, manifest links."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml
from PIL import Image

from genfusion.diffusion.pipelines import build_tiny_pipeline, load_generator, working_size
from genfusion.errors import GenfusionError
from genfusion.formats import read_annotations
from genfusion.layout import MANIFEST
from genfusion.params import VariationsParams, load_params, parse_params
from genfusion.stages import variations as variations_stage
from genfusion.stages.base_model import save_builtin
from genfusion.stages.seeds import run_seeds
from genfusion.stages.variations import make_variations, source_pairs

TORCH_THREADS = 1  # this module's torch threads (conftest.module_state): a worker's one core of CI's two
ROOT = Path(__file__).resolve().parents[1]
TINY = {"per_image": 2, "strength": 0.5, "steps": 2, "batch": 4, "seed": 11}
CORE = {"guidance": 2.0, "prompt": "an aerial photo of tree crowns", "resolution": 32}


@pytest.fixture(scope="module")
def workspace(neon_seeds: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real NEON tiles as `seeds` writes them, a tiny base model, tiny params."""
    root = tmp_path_factory.mktemp("variations")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["diffusion"] = {"resolution": 32}
    params["variations"] = TINY
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    loaded = load_params(root / "params.yaml")
    run_seeds(read_annotations(neon_seeds), loaded.seeds, loaded.classes, root / "data/real")
    save_builtin(build_tiny_pipeline(seed=0), root / "models/base")
    return root


@pytest.fixture(scope="module")
def pipe(workspace: Path):
    return load_generator(workspace / "models/base")


def vary(pipe, sources, out: Path, **changes) -> list[dict[str, str]]:
    settings = (
        TINY | {"guidance": 2.0, "prompt": "an aerial photo of tree crowns", "resolution": 32} | changes
    )
    prompt, resolution = settings.pop("prompt"), settings.pop("resolution")
    return make_variations(
        pipe,
        sources,
        VariationsParams(**settings),
        out,
        prompt=prompt,
        resolution=resolution,
        fingerprint="test-model",
    )


def manifest(out: Path) -> list[dict[str, str]]:
    with (out / MANIFEST).open() as f:
        return list(csv.DictReader(f))


def test_stage_varies_every_train_tile_and_carries_its_boxes(workspace: Path) -> None:
    real, out = workspace / "data/real", workspace / "data/variations"
    variations_stage.main(
        load_params(workspace / "params.yaml"),
        base=workspace / "models/base",
        finetuned=None,
        real=real,
        out=out,
    )
    sources = source_pairs(real)
    rows = manifest(out)
    assert len(rows) == 2 * len(sources) == len(list((out / "images").iterdir()))
    for s, (image, label) in enumerate(sources):
        for j in range(2):
            row = rows[2 * s + j]
            assert row["file"] == f"images/{image.stem}_v{j}.png"
            assert (row["source_image"], row["source_label"]) == (str(image), str(label))
            assert (int(row["variation"]), int(row["seed"])) == (j, TINY["seed"] + 2 * s + j)
            assert (out / row["label"]).read_bytes() == label.read_bytes()
            with Image.open(out / row["file"]) as varied, Image.open(image) as source:
                assert varied.size == source.size
                assert varied.tobytes() != source.tobytes()
    assert sum(bool((out / r["label"]).read_text().strip()) for r in rows) > 0  # boxes were carried


def test_odd_sized_tile_keeps_its_size_and_a_changed_label_is_recopied(pipe, tmp_path: Path) -> None:
    image, label = tmp_path / "tile.png", tmp_path / "tile.txt"
    Image.new("RGB", (100, 60), (40, 120, 40)).save(image)
    label.write_text("0 0.500000 0.500000 0.200000 0.300000\n")
    out = tmp_path / "out"
    vary(pipe, [(image, label)], out)
    first = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    with Image.open(out / "images" / "tile_v0.png") as varied:
        assert varied.size == (100, 60)

    label.write_text("0 0.400000 0.400000 0.200000 0.300000\n")
    vary(pipe, [(image, label)], out)
    assert (out / "labels" / "tile_v1.txt").read_bytes() == label.read_bytes()
    assert {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()} != first

    again = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    vary(pipe, [(image, label)], out)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()} == again  # nothing redone


def test_zero_per_image_gives_an_empty_valid_output(pipe, workspace: Path, tmp_path: Path) -> None:
    sources = source_pairs(workspace / "data/real")[:2]
    out = tmp_path / "out"
    vary(pipe, sources, out, per_image=1)
    assert len(list((out / "images").iterdir())) == 2
    assert vary(pipe, sources, out, per_image=0) == []
    assert list((out / "images").iterdir()) == list((out / "labels").iterdir()) == []
    assert (out / MANIFEST).read_text().startswith("file,label,source_image,")
    assert manifest(out) == []


def test_working_size_is_model_scale_in_multiples_of_8() -> None:
    assert working_size((320, 320), 64) == (64, 64)
    assert working_size((100, 60), 32) == (32, 16)
    assert working_size((20, 400), 512) == (24, 512)


def test_bad_input_is_refused(pipe, workspace: Path, tmp_path: Path) -> None:
    image = tmp_path / "images" / "train" / "a.png"
    image.parent.mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(image)
    with pytest.raises(GenfusionError, match=r"labels/train/a.txt is missing"):
        source_pairs(tmp_path)
    with pytest.raises(GenfusionError, match="variations.prompt: the prompt is empty"):
        vary(pipe, [], tmp_path / "out", prompt=" ")
    with pytest.raises(GenfusionError, match="diffusion.resolution: must be a multiple of 8"):
        vary(pipe, [], tmp_path / "out", resolution=30)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    with pytest.raises(GenfusionError, match="variations: steps x strength must be at least 1"):
        parse_params(params | {"variations": {"steps": 4, "strength": 0.2}})
