"""The inpaint stage on the tiny model and the real NEON tiles: deterministic and resumable
writing, only the layout's pixels repainted, labels known by construction, the ControlNet and
inpainting-checkpoint paths, and bad models refused before anything is written."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from checkpoints import ARCHITECTURES, RESOLUTION
from PIL import Image

from genfusion.boxes import Box
from genfusion.diffusion.pipelines import (
    build_tiny_pipeline,
    load_generator,
    load_pipeline,
    weights_fingerprint,
)
from genfusion.errors import GenfusionError
from genfusion.formats import read_annotations
from genfusion.formats.yolo import label_text
from genfusion.layout import MANIFEST
from genfusion.params import InpaintParams, Params, load_params, parse_params
from genfusion.placement import Tile, load_tiles
from genfusion.stages import inpaint as inpaint_stage
from genfusion.stages.base_model import save_builtin
from genfusion.stages.inpaint import (
    INPAINT_COLUMNS,
    layout_labels,
    make_inpaintings,
    working_mask,
)
from genfusion.stages.seeds import run_seeds

TORCH_THREADS = 1  # conftest.module_state; on 2 shared cores a second thread waits more than it helps
ROOT = Path(__file__).resolve().parents[1]
NAMES = ["tree"]
TINY = {"per_image": 2, "strength": 1.0, "steps": 2, "batch": 2, "seed": 5, "mask_grow": 2}
PROMPT = "an aerial photo of tree crowns"
TRAIN_TILES = 3  # the first real train tiles (in name order) keep the runs short


@pytest.fixture(scope="module")
def workspace(neon_seeds: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first real NEON train tiles as `seeds` writes them, and the tiny base model."""
    root = tmp_path_factory.mktemp("inpaint")
    (root / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    loaded = load_params(root / "params.yaml")
    assert loaded.classes == NAMES
    run_seeds(read_annotations(neon_seeds), loaded.seeds, loaded.classes, root / "all")
    for image in sorted((root / "all/images/train").glob("*.png"))[:TRAIN_TILES]:
        for sub, name in (("images", image.name), ("labels", f"{image.stem}.txt")):
            (root / "real" / sub / "train").mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / "all" / sub / "train" / name, root / "real" / sub / "train" / name)
    save_builtin(build_tiny_pipeline(seed=0), root / "models/base")
    return root


@pytest.fixture(scope="module")
def pipe(workspace: Path):
    return load_generator(workspace / "models/base")


@pytest.fixture(scope="module")
def tiles(workspace: Path) -> list[Tile]:
    return load_tiles(workspace / "real", NAMES)


@pytest.fixture(scope="module")
def first_run(pipe, tiles, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("first") / "out"
    paint(pipe, tiles, out)
    return out


def paint(pipe, tiles, out: Path, controlnet: Path | None = None, **changes) -> list[dict[str, str]]:
    return make_inpaintings(
        pipe,
        tiles,
        NAMES,
        InpaintParams(**(TINY | changes)),
        out,
        prompt=PROMPT,
        resolution=32,
        fingerprint="test-model",
        controlnet=controlnet,
    )


def files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def manifest(out: Path) -> list[dict[str, str]]:
    with (out / MANIFEST).open() as f:
        return list(csv.DictReader(f))


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def grown_mask(layout: list[Box], grow: int, size: tuple[int, int]) -> np.ndarray:
    mask = np.zeros((size[1], size[0]), bool)
    for b in layout:
        mask[max(int(b.y0) - grow, 0) : int(b.y1) + grow, max(int(b.x0) - grow, 0) : int(b.x1) + grow] = True
    return mask


def layout_of(row: dict[str, str]) -> list[Box]:
    return [Box(label, x0, y0, x1, y1) for label, x0, y0, x1, y1 in json.loads(row["boxes"])]


def expected_labels(tile: Tile, layout: list[Box], grow: int, max_occlusion: float) -> list[Box]:
    """Written out afresh: object i is covered by the union of the grown layout boxes after it
    (every layout box for the tile's objects); more than max_occlusion (or all of it) covered:
    gone; partly: shrunk to its uncovered pixels."""
    width, height = tile.size
    objects = [*tile.boxes, *layout]
    kept = []
    for i, box in enumerate(objects):
        later = layout[max(i - len(tile.boxes) + 1, 0) :]
        cover = grown_mask(later, grow, tile.size)
        x0, y0 = max(int(np.floor(box.x0)), 0), max(int(np.floor(box.y0)), 0)
        x1, y1 = min(int(np.ceil(box.x1)), width), min(int(np.ceil(box.y1)), height)
        window = cover[y0:y1, x0:x1]
        share = window.mean()
        if share > max_occlusion or share == 1:
            continue
        if share == 0:
            kept.append(box)
            continue
        rows, cols = np.nonzero(~window)
        kept.append(box.intersect(x0 + cols.min(), y0 + rows.min(), x0 + cols.max() + 1, y0 + rows.max() + 1))
    return kept


def test_runs_are_deterministic_and_resume_makes_only_what_is_missing(
    pipe, tiles, first_run, tmp_path
) -> None:
    out = tmp_path / "again"
    paint(pipe, tiles, out)
    made = files(first_run)
    assert files(out) == made
    assert len([name for name in made if name.startswith("images/")]) == TRAIN_TILES * TINY["per_image"]

    gone = ["images/" + p.name for p in sorted((out / "images").iterdir())[1:4:2]]
    (out / gone[0]).unlink()
    (out / gone[1]).unlink()
    (out / gone[1].replace("images/", "labels/").replace(".png", ".txt")).unlink()
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    paint(pipe, tiles, out)
    assert files(out) == made
    remade = {p.name for p in (out / "images").iterdir() if stamps.get(p.name) != p.stat().st_mtime_ns}
    assert remade == {Path(name).name for name in gone}


def test_only_the_grown_layout_boxes_are_repainted(first_run, tiles) -> None:
    by_path = {str(tile.path): tile for tile in tiles}
    for row in manifest(first_run):
        tile = by_path[row["background"]]
        made = pixels(first_run / row["file"])
        mask = grown_mask(layout_of(row), TINY["mask_grow"], tile.size)
        assert made.shape == tile.pixels.shape
        assert mask.any() and not mask.all()
        assert np.array_equal(made[~mask], tile.pixels[~mask])  # byte for byte outside
        assert (made[mask] != tile.pixels[mask]).any()


def test_labels_are_the_tiles_uncovered_objects_then_the_layout(first_run, tiles) -> None:
    by_path = {str(tile.path): tile for tile in tiles}
    removed = shrunk = layout_boxes = 0
    for row in manifest(first_run):
        tile, layout = by_path[row["background"]], layout_of(row)
        expected = expected_labels(tile, layout, TINY["mask_grow"], 0.5)
        assert (first_run / row["label"]).read_text() == label_text(expected, NAMES, tile.size, "detect")
        kept_tile = [box for box in expected if box in tile.boxes]
        removed += len(tile.boxes) + len(layout) - len(expected)
        shrunk += len(expected) - len(kept_tile) - sum(box in layout for box in expected)
        layout_boxes += sum(box in layout for box in expected)
    assert removed and shrunk and layout_boxes  # every case met on the real tiles


def test_manifest_names_background_layout_seed_and_model(first_run, tiles) -> None:
    rows = manifest(first_run)
    assert tuple(rows[0]) == INPAINT_COLUMNS
    for s, tile in enumerate(tiles):
        for j in range(TINY["per_image"]):
            row = rows[s * TINY["per_image"] + j]
            assert row["file"] == f"images/{tile.stem}_i{j}.png"
            assert row["label"] == f"labels/{tile.stem}_i{j}.txt"
            assert (row["background"], row["background_sha256"]) == (str(tile.path), tile.sha256)
            assert int(row["seed"]) == TINY["seed"] + s * TINY["per_image"] + j
            layout = layout_of(row)
            assert layout and all(
                0 <= b.x0 < b.x1 <= tile.size[0] and 0 <= b.y0 < b.y1 <= tile.size[1] for b in layout
            )
            assert (row["model"], row["prompt"], row["controlnet"]) == ("test-model", PROMPT, "")
            assert (row["steps"], row["strength"], row["scheduler"], row["resolution"]) == (
                "2",
                "1.0",
                "ddim",
                "32",
            )
            assert (row["dtype"], row["device"], row["attention_slicing"]) == ("float32", "cpu", "False")
    layouts = {row["boxes"] for row in rows}
    assert len(layouts) == len(rows)  # each image its own layout


def test_occlusion_and_mask_geometry_by_hand() -> None:
    tile = Tile(
        "t",
        Path("t.png"),
        np.zeros((40, 60, 3), np.uint8),
        (Box("tree", 0, 0, 10, 10), Box("tree", 20, 20, 30, 30), Box("tree", 40, 0, 50, 10)),
        "",
    )
    layout = [Box("tree", 0, 0, 10, 10), Box("tree", 25, 20, 35, 30)]
    grown = [(0, 0, 10, 10), (25, 20, 35, 30)]
    # the first tile object is hidden entirely, the second half, the third not at all
    assert layout_labels(tile, layout, grown, 0.4) == [tile.boxes[2], *layout]
    assert layout_labels(tile, layout, grown, 0.6) == [Box("tree", 20, 20, 25, 30), tile.boxes[2], *layout]
    assert layout_labels(tile, layout, grown, 1.0) == [Box("tree", 20, 20, 25, 30), tile.boxes[2], *layout]
    # a 60 x 40 tile worked at 30 x 20 with latent cells of 4 px: the box widens to whole cells
    mask = working_mask([(10, 10, 14, 22)], (60, 40), (30, 20), 4)
    assert np.argwhere(mask).min(0).tolist() == [4, 4] and np.argwhere(mask).max(0).tolist() == [11, 7]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_real_architectures_inpaint_by_blending(architecture, tiles, tmp_path) -> None:
    """Scaled-down SD 1.x, SD 2.x and SDXL checkpoints (4-channel UNets) through the same path."""
    checkpoint = load_pipeline(str(ARCHITECTURES[architecture](tmp_path / architecture)))
    out = tmp_path / "out"
    row = make_inpaintings(
        checkpoint,
        tiles[:1],
        NAMES,
        InpaintParams(**(TINY | {"per_image": 1})),
        out,
        prompt=PROMPT,
        resolution=RESOLUTION,
        fingerprint=architecture,
    )[0]
    made, tile = pixels(out / row["file"]), tiles[0]
    mask = grown_mask(layout_of(row), TINY["mask_grow"], tile.size)
    assert np.array_equal(made[~mask], tile.pixels[~mask])
    assert (made[mask] != tile.pixels[mask]).any()


def random_controlnet(pipe, folder: Path, stride_blocks: tuple[int, ...]) -> Path:
    """A tiny ControlNet with random weights everywhere, its zero convolutions included (else it
    changes nothing)."""
    from diffusers import ControlNetModel

    torch.manual_seed(1)
    model = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=stride_blocks)
    with torch.no_grad():
        for p in [*model.controlnet_down_blocks.parameters(), *model.controlnet_mid_block.parameters()]:
            p.normal_(0, 0.5)
    model.save_pretrained(folder)
    return folder


def test_controlnet_conditions_on_the_layout(pipe, tiles, tmp_path) -> None:
    folder = random_controlnet(pipe, tmp_path / "controlnet", (16, 32))  # shrinks 2x, as the tiny VAE
    out, without = tmp_path / "out", tmp_path / "without"
    row = paint(pipe, tiles[:1], out, controlnet=folder, per_image=1)[0]
    plain = paint(pipe, tiles[:1], without, per_image=1)[0]
    assert (row["controlnet"], plain["controlnet"]) == (weights_fingerprint(folder)[:16], "")
    assert row["boxes"] == plain["boxes"]  # the same layout, drawn alike
    tile, made = tiles[0], pixels(out / row["file"])
    mask = grown_mask(layout_of(row), TINY["mask_grow"], tile.size)
    assert np.array_equal(made[~mask], tile.pixels[~mask])
    assert not np.array_equal(made, pixels(without / row["file"]))  # the ControlNet changed it
    assert (out / row["label"]).read_bytes() == (without / row["label"]).read_bytes()


def test_a_bad_controlnet_is_refused_before_anything_is_written(pipe, tiles, tmp_path) -> None:
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(GenfusionError, match=rf"inpaint.controlnet: {empty} holds no readable config.json"):
        paint(pipe, tiles, out, controlnet=empty)
    with pytest.raises(GenfusionError, match=rf"inpaint.controlnet: {tmp_path / 'nowhere'} is not a folder"):
        paint(pipe, tiles, out, controlnet=tmp_path / "nowhere")
    unet = tmp_path / "unet"
    pipe.unet.save_pretrained(unet)
    with pytest.raises(GenfusionError, match=rf"inpaint.controlnet: {unet} holds a UNet2DConditionModel"):
        paint(pipe, tiles, out, controlnet=unet)
    broken = random_controlnet(pipe, tmp_path / "broken", (16, 32))
    (broken / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights")
    with pytest.raises(GenfusionError, match=rf"inpaint.controlnet: {broken}: cannot load"):
        paint(pipe, tiles, out, controlnet=broken)
    misfit = random_controlnet(pipe, tmp_path / "misfit", (16, 32, 96, 256))  # SD's 8x
    with pytest.raises(
        GenfusionError, match=rf"inpaint.controlnet: {misfit}: .*shrinks its condition 8 times"
    ):
        paint(pipe, tiles, out, controlnet=misfit)
    assert not out.exists()


def stage_params(**inpaint) -> Params:
    """The project's params with the tiny model's resolution and tiny inpaint settings."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["diffusion"] = {"resolution": 32}
    raw["inpaint"] = TINY | {"per_image": 1} | inpaint
    return parse_params(raw)


def inpainting_checkpoint(folder: Path) -> Path:
    """The tiny model with a 9-channel UNet (latents, mask, masked image), native at 32 px."""
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel

    tiny = build_tiny_pipeline(seed=0)
    torch.manual_seed(2)
    unet = UNet2DConditionModel.from_config({**tiny.unet.config, "in_channels": 9, "sample_size": 16})
    StableDiffusionInpaintPipeline(**(tiny.components | {"unet": unet.eval()})).save_pretrained(folder)
    return folder


def test_stage_with_the_generator_and_with_an_inpainting_checkpoint(workspace, tmp_path) -> None:
    real, base = workspace / "real", workspace / "models/base"
    plain, dedicated = tmp_path / "plain", tmp_path / "dedicated"
    inpaint_stage.main(stage_params(), subject="trees", base=base, finetuned=None, real=real, out=plain)
    checkpoint = inpainting_checkpoint(tmp_path / "checkpoint")
    inpaint_stage.main(
        stage_params(checkpoint=str(checkpoint)),
        subject="trees",
        base=base,
        finetuned=None,
        real=real,
        out=dedicated,
        checkpoints=tmp_path,
    )
    tiles = load_tiles(real, NAMES)
    for out in (plain, dedicated):
        rows = manifest(out)
        assert len(rows) == len(tiles) == len(list((out / "images").iterdir()))
        assert rows[0]["prompt"] == "an aerial photo of tree crowns"  # {instance_prompt}, no fine-tune
        for tile, row in zip(tiles, rows, strict=True):
            made = pixels(out / row["file"])
            mask = grown_mask(layout_of(row), TINY["mask_grow"], tile.size)
            assert np.array_equal(made[~mask], tile.pixels[~mask])
            assert (made[mask] != tile.pixels[mask]).any()
    assert manifest(plain)[0]["model"] != manifest(dedicated)[0]["model"]
    assert manifest(plain)[0]["boxes"] == manifest(dedicated)[0]["boxes"]


def test_a_bad_checkpoint_is_refused_before_anything_is_written(workspace, tmp_path) -> None:
    real, base, out = workspace / "real", workspace / "models/base", tmp_path / "out"
    broken = inpainting_checkpoint(tmp_path / "broken")
    (broken / "unet/diffusion_pytorch_model.safetensors").write_bytes(b"not weights")
    not_pipeline = tmp_path / "plain-folder"
    not_pipeline.mkdir()
    for folder, problem in (
        (broken, "cannot load the pipeline"),
        (not_pipeline, "is not a diffusers pipeline folder"),
        (tmp_path / "nowhere", "is not a folder"),
    ):
        with pytest.raises(GenfusionError, match=rf"inpaint.checkpoint: {folder}:? {problem}"):
            inpaint_stage.main(
                stage_params(checkpoint=str(folder)),
                subject="trees",
                base=base,
                finetuned=None,
                real=real,
                out=out,
                checkpoints=tmp_path,
            )
    assert not out.exists()
    # A checkpoint outside the folder DVC tracks (models/checkpoints/ in dvc.yaml) is refused.
    elsewhere = inpainting_checkpoint(tmp_path / "elsewhere")
    with pytest.raises(
        GenfusionError, match=rf"inpaint.checkpoint: {elsewhere} is outside {tmp_path / 'tracked'}/"
    ):
        inpaint_stage.main(
            stage_params(checkpoint=str(elsewhere)),
            subject="trees",
            base=base,
            finetuned=None,
            real=real,
            out=out,
            checkpoints=tmp_path / "tracked",
        )
    assert not out.exists()


def test_bad_settings_are_refused(pipe, tiles, tmp_path) -> None:
    with pytest.raises(GenfusionError, match="inpaint.prompt: the prompt is empty"):
        make_inpaintings(
            pipe, tiles, NAMES, InpaintParams(**TINY), tmp_path, prompt=" ", resolution=32, fingerprint="m"
        )
    with pytest.raises(GenfusionError, match="inpaint: an object of .* lower inpaint.scale"):
        paint(pipe, tiles, tmp_path / "out", scale=(40.0, 40.0))
    with pytest.raises(ValueError, match="steps x strength must be at least 1"):
        InpaintParams(steps=4, strength=0.2)
