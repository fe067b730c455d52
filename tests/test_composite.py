"""The composite stage: copy-paste images whose labels are known by construction, written
deterministically and resumably, and the `composite` dataset variant built on them."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from PIL import Image
from pydantic import ValidationError
from typer.testing import CliRunner

from genfusion.boxes import Box, polygon_box
from genfusion.cli import app
from genfusion.cli import main as cli_main
from genfusion.errors import GenfusionError
from genfusion.formats import read_annotations
from genfusion.formats.yolo import parse_yolo_line
from genfusion.launch import THREAD_VARS
from genfusion.layout import MANIFEST, Sources
from genfusion.params import CompositeParams, load_params
from genfusion.placement import (
    Footprint,
    Instance,
    Placement,
    Tile,
    cut_instances,
    load_tiles,
    settle_occlusion,
)
from genfusion.stages.composite import COMPOSITE_COLUMNS, make_composites, render_composite, transform_polygon
from genfusion.stages.datasets import build_dataset
from genfusion.stages.seeds import run_seeds

ROOT = Path(__file__).resolve().parents[1]
SEG_FIXTURE = ROOT / "tests" / "data" / "seg-trees"
NAMES = ["tree"]
BASE = {"per_image": 2, "seed": 3, "batch": 2}
TRAIN_TILES = 3  # of the real train tiles, the first few (in name order) keep the runs short


@pytest.fixture(scope="module")
def real(neon_seeds: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first real NEON train tiles, with their labels, as `seeds` writes them."""
    root = tmp_path_factory.mktemp("composite")
    (root / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    loaded = load_params(root / "params.yaml")
    assert loaded.classes == NAMES
    run_seeds(read_annotations(neon_seeds), loaded.seeds, loaded.classes, root / "data/real")
    small = root / "small"
    for image in sorted((root / "data/real/images/train").glob("*.png"))[:TRAIN_TILES]:
        for sub, name in (("images", image.name), ("labels", f"{image.stem}.txt")):
            (small / sub / "train").mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / "data/real" / sub / "train" / name, small / sub / "train" / name)
    shutil.copy2(root / "data/real/dataset.yaml", small / "dataset.yaml")
    return small


def compose(real: Path, out: Path, task: str = "detect", **changes) -> list[dict[str, str]]:
    return make_composites(
        load_tiles(real, NAMES), NAMES, CompositeParams(**(BASE | changes)), out, task=task
    )


def files(out: Path) -> dict[str, bytes]:
    """Every file under `out`, hidden ones included, by relative path."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def manifest(out: Path) -> list[dict[str, str]]:
    with (out / MANIFEST).open(newline="") as f:
        return list(csv.DictReader(f))


def identity(out: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every image and label: a file written again gets a new inode."""
    return {
        p.relative_to(out).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns)
        for sub in ("images", "labels")
        for p in (out / sub).iterdir()
    }


def made_counts(caplog: pytest.LogCaptureFixture) -> tuple[int, int]:
    """(images to make, images kept) of the last run, from its log line."""
    found = re.findall(r"composite: (\d+) images to make, (\d+) kept", caplog.text)
    assert found, caplog.text
    caplog.clear()
    return int(found[-1][0]), int(found[-1][1])


def label_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()]


# 1. Determinism -----------------------------------------------------------------------------


def test_same_params_give_identical_files_and_another_seed_other_images(real: Path, tmp_path: Path) -> None:
    rows = compose(real, tmp_path / "a")
    compose(real, tmp_path / "b")
    first = files(tmp_path / "a")
    assert first == files(tmp_path / "b")
    tiles = sorted((real / "images" / "train").glob("*.png"))
    expected = {
        f"{sub}/{t.stem}_c{j}.{ext}"
        for t in tiles
        for j in range(2)
        for sub, ext in (("images", "png"), ("labels", "txt"))
    }
    assert set(first) == expected | {MANIFEST}  # no temp file left behind
    assert manifest(tmp_path / "a") == rows
    assert list(rows[0]) == list(COMPOSITE_COLUMNS)
    for s, tile in enumerate(tiles):
        source_lines = (real / "labels" / "train" / f"{tile.stem}.txt").read_text().splitlines()
        for j in range(2):
            row = rows[2 * s + j]
            assert (row["file"], row["label"]) == (
                f"images/{tile.stem}_c{j}.png",
                f"labels/{tile.stem}_c{j}.txt",
            )
            assert int(row["seed"]) == BASE["seed"] + 2 * s + j
            assert row["background"] == str(tile)
            assert row["background_sha256"] == hashlib.sha256(tile.read_bytes()).hexdigest()
            assert json.loads(row["settings"])["seed"] == BASE["seed"]
            for source in row["objects"].split():  # <tile stem>#<line of its label file>
                stem, line = source.split("#")
                lines = (real / "labels" / "train" / f"{stem}.txt").read_text().splitlines()
                assert 1 <= int(line) <= len(lines)
            with Image.open(tmp_path / "a" / row["file"]) as made, Image.open(tile) as background:
                assert made.size == background.size and made.mode == "RGB"
                assert made.tobytes() != background.tobytes()  # something was pasted
            assert len(label_lines(tmp_path / "a" / row["label"])) >= 1
        assert source_lines  # the tile holds objects, to keep and to paste

    other = compose(real, tmp_path / "c", seed=1000)
    assert [r["file"] for r in other] == [r["file"] for r in rows]
    for row in other:
        assert (tmp_path / "c" / row["file"]).read_bytes() != first[row["file"]]


# 2. Resume and incremental runs ----------------------------------------------------------------


def test_a_rerun_makes_only_what_is_missing_and_matches_an_uninterrupted_run(
    real: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="genfusion.jobs")
    reference = tmp_path / "reference"
    rows = compose(real, reference)
    total = len(rows)
    assert made_counts(caplog) == (total, 0)

    out = tmp_path / "out"
    compose(real, out)
    caplog.clear()
    # As a killed run leaves it: the manifest lists only the first rows done; of those, one
    # image and one other's label are gone. The rest (on disk, not listed) are made again.
    listed = total // 2 + 1
    text = (out / MANIFEST).read_text().splitlines(keepends=True)
    (out / MANIFEST).write_text("".join(text[: 1 + listed]))
    (out / rows[0]["file"]).unlink()
    (out / rows[1]["label"]).unlink()
    (out / "images" / f".{Path(rows[-1]['file']).name}.x1y2.tmp").write_bytes(b"half a png")
    (out / f".{MANIFEST}.x1y2.tmp").write_text("file,label\n")
    before = identity(out)
    compose(real, out)
    kept = listed - 2
    assert made_counts(caplog) == (total - kept, kept)
    after = identity(out)
    for row in rows[2:listed]:
        assert after[row["file"]] == before[row["file"]]  # not written again
        assert after[row["label"]] == before[row["label"]]
    for row in rows[listed:]:
        assert after[row["file"]] != before[row["file"]]
    assert files(out) == files(reference)  # the temp files of the killed run are gone too

    compose(real, out)  # nothing changed: nothing made
    assert made_counts(caplog) == (0, total)
    assert identity(out) == after

    compose(real, out, colour_jitter=0.3)  # a changed setting remakes all
    assert made_counts(caplog) == (total, 0)
    remade = identity(out)
    assert all(remade[name] != after[name] for name in after)
    assert any(files(out)[r["file"]] != files(reference)[r["file"]] for r in rows)

    one = compose(real, out, per_image=1)  # fewer per tile: the others are removed
    tiles = sorted((real / "images" / "train").glob("*.png"))
    assert [r["file"] for r in one] == [f"images/{t.stem}_c0.png" for t in tiles]
    assert set(files(out)) == {r["file"] for r in one} | {r["label"] for r in one} | {MANIFEST}
    assert manifest(out) == one


# 3. Labels known by construction ---------------------------------------------------------------


def flat_tile(width: int, height: int, boxes: tuple[Box, ...] = (), grey: int = 60) -> Tile:
    return Tile("bg", Path("bg.png"), np.full((height, width, 3), grey, np.uint8), boxes, "0" * 64)


def bright_instance(width: int, height: int) -> Instance:
    """A bright, textured cut-out whose every pixel differs from the flat grey background."""
    ys, xs = np.mgrid[0:height, 0:width]
    pixels = np.stack([200 + (xs * 5) % 56, 200 + (ys * 7) % 56, 255 - (xs + ys) % 40], axis=-1)
    return Instance("src#1", "tree", pixels.astype(np.uint8), np.ones((height, width), np.uint8), ())


def outside(pixels: np.ndarray, windows: list[tuple[int, int, int, int]]) -> np.ndarray:
    keep = np.ones(pixels.shape[:2], bool)
    for x, y, w, h in windows:
        keep[y : y + h, x : x + w] = False
    return keep


@pytest.mark.parametrize("blend", ["gaussian", "poisson"])
def test_every_pasted_object_is_labelled_with_its_placement_and_only_its_window_changes(blend: str) -> None:
    background = flat_tile(64, 48)
    instance = bright_instance(14, 10)
    placements = [
        Placement(0, 5, 6, 14, 10, 0, False, (1.0, 1.0, 1.0)),
        Placement(0, 30, 20, 20, 28, 1, True, (1.1, 0.9, 1.05)),  # turned: 10 x 14, enlarged twice
    ]
    settings = CompositeParams(blend=blend, feather=1.5)
    pixels, labels = render_composite(background, [instance], placements, settings)
    assert labels == [Box("tree", p.x, p.y, p.x + p.width, p.y + p.height) for p in placements]
    windows = [(p.x, p.y, p.width, p.height) for p in placements]
    keep = outside(pixels, windows)
    assert (pixels[keep] == background.pixels[keep]).all()
    for x, y, w, h in windows:
        changed = (pixels[y : y + h, x : x + w] != background.pixels[y : y + h, x : x + w]).any(axis=-1)
        # Poisson cloning keeps the cut-out's gradients, not its colours: most pixels still move.
        assert changed.all() if blend == "gaussian" else changed.mean() > 0.5


def test_a_hard_edged_paste_is_the_turned_and_mirrored_cut_out_pixel_for_pixel() -> None:
    background = flat_tile(64, 48)
    instance = bright_instance(14, 10)
    settings = CompositeParams(feather=0)
    for turns in range(4):
        for mirror in (False, True):
            expected = np.rot90(instance.pixels, turns)
            if mirror:
                expected = expected[:, ::-1]
            h, w = expected.shape[:2]
            placement = Placement(0, 40, 3, w, h, turns, mirror, (1.0, 1.0, 1.0))
            pixels, labels = render_composite(background, [instance], [placement], settings)
            assert labels == [Box("tree", 40, 3, 40 + w, 3 + h)]
            assert (pixels[3 : 3 + h, 40 : 40 + w] == expected).all(), (turns, mirror)
            keep = outside(pixels, [(40, 3, w, h)])
            assert (pixels[keep] == background.pixels[keep]).all()


def test_each_composite_labels_its_background_objects_left_visible_and_the_pasted_object(
    real: Path, tmp_path: Path
) -> None:
    """With one object pasted per composite (a tiny density), the labels follow from the geometry
    alone: the background's boxes hidden by at most max_occlusion of their pixels (the pasted box
    is its placement rectangle, read back from the last line), unchanged where nothing covers
    them, then the pasted object, whose sides are its source's times a factor from `scale`."""
    low, high = 0.8, 1.25
    density = 0.01
    tiles = load_tiles(real, NAMES)
    assert all(round(density * len(t.boxes)) == 0 for t in tiles)  # so one object each
    rows = compose(real, tmp_path / "out", density=density, scale=(low, high), max_occlusion=0.5)
    assert len(rows) == 2 * len(tiles)
    for i, row in enumerate(rows):
        tile = tiles[i // 2]
        assert row["background"] == str(tile.path)
        width, height = tile.size
        [source] = row["objects"].split()
        lines = label_lines(tmp_path / "out" / row["label"])
        written = [parse_yolo_line(line, NAMES, width, height) for line in lines]
        pasted = written[-1]
        corners = np.array([pasted.x0, pasted.y0, pasted.x1, pasted.y1])
        assert np.abs(corners - np.round(corners)).max() < 1e-2  # a whole-pixel placement
        px0, py0, px1, py1 = (int(v) for v in np.round(corners))
        expected = []
        for box in tile.boxes:
            x0, y0 = max(int(np.floor(box.x0)), 0), max(int(np.floor(box.y0)), 0)
            x1, y1 = min(int(np.ceil(box.x1)), width), min(int(np.ceil(box.y1)), height)
            hidden = max(0, min(x1, px1) - max(x0, px0)) * max(0, min(y1, py1) - max(y0, py0))
            share = hidden / ((x1 - x0) * (y1 - y0))
            if share <= 0.5:
                expected.append((box, share, (x0, y0, x1, y1)))
        assert len(written) == len(expected) + 1, row["file"]
        for got, (box, share, (x0, y0, x1, y1)) in zip(written[:-1], expected, strict=True):
            if share == 0:
                assert (got.x0, got.y0, got.x1, got.y1) == pytest.approx(
                    (box.x0, box.y0, box.x1, box.y1), abs=1e-2
                )
            else:  # shrunk to its visible pixels: within its own pixels
                assert x0 - 1e-2 <= got.x0 < got.x1 <= x1 + 1e-2 and y0 - 1e-2 <= got.y0 < got.y1 <= y1 + 1e-2
        stem, number = source.split("#")
        [origin] = [t for t in tiles if t.stem == stem]
        cut = origin.boxes[int(number) - 1]
        cut_w = min(np.ceil(cut.x1), origin.size[0]) - max(np.floor(cut.x0), 0)
        cut_h = min(np.ceil(cut.y1), origin.size[1]) - max(np.floor(cut.y0), 0)
        w, h = px1 - px0, py1 - py0
        fits = [
            low - 0.5 / a <= w / a <= high + 0.5 / a and low - 0.5 / b <= h / b <= high + 0.5 / b
            for a, b in ((cut_w, cut_h), (cut_h, cut_w))  # as cut, or a quarter turn
        ]
        assert any(fits), (row["file"], (w, h), (cut_w, cut_h))


# 4. Occlusion ----------------------------------------------------------------------------------


def solid(width: int, height: int) -> Instance:
    return Instance(
        "src#1", "tree", np.full((height, width, 3), 230, np.uint8), np.ones((height, width), np.uint8), ()
    )


def paste(instance: int, x: int, y: int, w: int, h: int) -> Placement:
    return Placement(instance, x, y, w, h, 0, False, (1.0, 1.0, 1.0))


A = Box("tree", 10, 10, 30, 30)  # a background object
NEVER_HIDDEN = Box("tree", 40.25, 5.5, 55.75, 20.5)  # fractional, as read from a YOLO line


def test_an_object_pasted_fully_over_an_earlier_one_removes_its_label() -> None:
    background = flat_tile(64, 64, (A, NEVER_HIDDEN))
    for blend in ("gaussian", "poisson"):
        _, labels = render_composite(
            background,
            [solid(20, 20)],
            [paste(0, 10, 10, 20, 20)],
            CompositeParams(blend=blend, max_occlusion=0.99),
        )
        assert labels == [NEVER_HIDDEN, Box("tree", 10, 10, 30, 30)]
    # A pasted object fully covered by a later one is removed the same way.
    _, labels = render_composite(
        flat_tile(64, 64),
        [solid(20, 20), solid(24, 24)],
        [paste(0, 20, 20, 20, 20), paste(1, 18, 18, 24, 24)],
        CompositeParams(),
    )
    assert labels == [Box("tree", 18, 18, 42, 42)]


@pytest.mark.parametrize("max_occlusion", [0.25, 0.3, 0.5])
def test_a_side_strip_shrinks_an_earlier_box_to_its_visible_part_or_removes_it(max_occlusion: float) -> None:
    """A strip 6 px wide over the right of 20 px wide objects hides 30 % of each: a background
    box and a pasted one alike. Kept (shrunk) up to max_occlusion 0.3, removed below."""
    strip = solid(6, 30)
    pasted = paste(0, 34, 30, 20, 20)  # P, over nothing
    placements = [pasted, paste(1, 24, 5, 6, 30), paste(1, 48, 25, 6, 30)]
    background = flat_tile(64, 64, (A, NEVER_HIDDEN))
    _, labels = render_composite(
        background, [solid(20, 20), strip], placements, CompositeParams(max_occlusion=max_occlusion)
    )
    strips = [Box("tree", 24, 5, 30, 35), Box("tree", 48, 25, 54, 55)]
    hidden = 6 / 20
    if hidden <= max_occlusion:
        assert labels == [Box("tree", 10, 10, 24, 30), NEVER_HIDDEN, Box("tree", 34, 30, 48, 50), *strips]
    else:
        assert labels == [NEVER_HIDDEN, *strips]
    assert labels[labels.index(NEVER_HIDDEN)] is NEVER_HIDDEN  # untouched, not rebuilt


def test_settle_occlusion_reads_hidden_shares_from_the_paste_order_and_own_pixels() -> None:
    order = np.zeros((40, 40), np.int32)
    boxes = [Box("tree", 0, 0, 20, 20), Box("tree", 10, 0, 30, 20), Box("tree", 25, 25, 35, 35)]
    # Object 1 (pasted) is a triangle in its box: only its own pixels count, and cover.
    triangle = np.tril(np.ones((20, 20), np.uint8))
    order[0:20, 10:30][triangle.astype(bool)] = 2
    masks = [None, Footprint(10, 0, triangle), None]
    covered = int(triangle[:, :10].sum())  # of object 0's 400 px: fewer than the box's 200
    share = covered / 400
    assert share < 0.5
    # Object 0's visible pixels: all of its left half, and the right half above the triangle.
    assert settle_occlusion(boxes, masks, order, max_occlusion=share) == [
        Box("tree", 0, 0, 20, 20),
        *boxes[1:],
    ]
    assert settle_occlusion(boxes, masks, order, max_occlusion=share - 0.01) == boxes[1:]
    # An outline partly hidden is kept as it is; hidden over max_occlusion it is removed.
    outline = polygon_box("tree", [(0, 0), (20, 0), (20, 20), (0, 20)])
    order[0:20, 12:20] = 2
    assert settle_occlusion([outline, boxes[1]], [None, Footprint(10, 0, triangle)], order, 0.5) == [
        outline,
        boxes[1],
    ]
    assert settle_occlusion([outline, boxes[1]], [None, Footprint(10, 0, triangle)], order, 0.3) == [boxes[1]]
    # With a later object over columns 12..19 too, a box sees only columns 0..11 (and 11 is
    # visible on row 0 alone, above the triangle): it shrinks to them.
    assert settle_occlusion([boxes[0], boxes[1]], [None, Footprint(10, 0, triangle)], order, 0.5)[0] == Box(
        "tree", 0, 0, 12, 20
    )


def test_a_fully_hidden_object_at_max_occlusion_one_does_not_crash_the_render() -> None:
    """max_occlusion 1.0 is allowed (0..1): a fully hidden box (share 1.0, not more than 1.0) has
    no visible pixel to shrink to, and an object nothing of which is visible is not labelled."""
    background = flat_tile(64, 64, (A,))
    _, labels = render_composite(
        background, [solid(20, 20)], [paste(0, 10, 10, 20, 20)], CompositeParams(max_occlusion=1.0)
    )
    assert labels == [Box("tree", 10, 10, 30, 30)]


def test_a_partly_hidden_fractional_box_shrinks_within_its_own_bounds() -> None:
    """A box read from a YOLO line has fractional corners: shrunk, it is the original box cut to
    its visible part, never larger than the original on its uncovered sides."""
    box = Box("tree", 10.5, 10.5, 50.5, 30.5)
    order = np.zeros((60, 60), np.int32)
    order[0:40, 38:60] = 2
    cover = Box("tree", 38, 0, 60, 40)
    [shrunk, kept_cover] = settle_occlusion(
        [box, cover], [None, Footprint(38, 0, np.ones((40, 22), np.uint8))], order, 0.5
    )
    assert kept_cover == cover
    assert (shrunk.x0, shrunk.y0, shrunk.x1, shrunk.y1) == (10.5, 10.5, 38, 30.5)


# 5. Segment task -------------------------------------------------------------------------------


def rasterise(polygon, height: int, width: int, fine: int = 8) -> np.ndarray:
    """The pixels the polygon covers at least half of (corners at integer coordinates), measured
    on a grid `fine` times finer, so that no edge is favoured by the scan converter."""
    mask = np.zeros((height * fine, width * fine), np.uint8)
    points = np.round((np.array(polygon, np.float64) * fine - 0.5) * 16).astype(np.int32)
    cv2.fillPoly(mask, [points], 1, lineType=cv2.LINE_8, shift=4)
    return mask.reshape(height, fine, width, fine).mean(axis=(1, 3)) >= 0.5


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / (a | b).sum()


def test_transform_polygon_follows_rot90_and_mirror_of_the_pixels() -> None:
    width, height = 45, 28
    polygon = [(3.0, 2.0), (40.0, 6.0), (30.0, 25.0), (8.0, 20.0)]  # no symmetry
    mask = rasterise(polygon, height, width)
    for turns in range(4):
        for mirror in (False, True):
            for factor in (1, 2):
                moved = np.rot90(mask, turns)
                if mirror:
                    moved = moved[:, ::-1]
                h, w = moved.shape[0] * factor, moved.shape[1] * factor
                expected = np.zeros((7 + h, 5 + w), bool)
                expected[7:, 5:] = (
                    cv2.resize(moved.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
                )
                outline = transform_polygon(
                    polygon, (width, height), Placement(0, 5, 7, w, h, turns, mirror, (1, 1, 1))
                )
                assert iou(rasterise(outline, 7 + h, 5 + w), expected) > 0.9, (turns, mirror, factor)


@pytest.fixture(scope="module")
def seg_real(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiles of 64 px with outline labels, as `seeds` writes them for `task: segment`."""
    root = tmp_path_factory.mktemp("composite-seg")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["task"] = "segment"
    params["train"]["model"] = "yolov8n-seg.yaml"
    params["seeds"].update(
        source=str(SEG_FIXTURE / "annotations.json"), tile_size=64, tile_overlap=0, split_by="tile"
    )
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    loaded = load_params(root / "params.yaml")
    run_seeds(read_annotations(loaded.seeds.source), loaded.seeds, loaded.classes, root / "real", loaded.task)
    return root / "real"


def test_segment_composites_are_labelled_with_outlines(seg_real: Path, tmp_path: Path) -> None:
    rows = compose(seg_real, tmp_path / "out", task="segment", per_image=1, min_size=4)
    assert rows
    for row in rows:
        lines = label_lines(tmp_path / "out" / row["label"])
        assert len(lines) >= 1  # at least the last pasted object
        for line in lines:
            parts = line.split()
            assert len(parts) >= 7 and len(parts) % 2 == 1, line  # class x1 y1 x2 y2 x3 y3 ...
    # The stage gives the composite dataset the outlines `task: segment` trains on.
    counts = build_dataset(
        "composite", sources(seg_real, tmp_path / "out", tmp_path), tmp_path / "dataset", task="segment"
    )
    assert counts["synthetic_images"] == len(rows)


def test_a_pasted_outline_enlarged_past_a_pixel_of_margin_is_labelled() -> None:
    """A cut-out is cut at the whole pixels around its outline, so the outline sits up to 1 px
    inside the cut; enlarged (composite.scale above 1, as the default [0.8, 1.25] draws), it sits
    more than 1 px inside the placement. Its hidden share is read over the placement's window
    and mask, not the outline's bounds (whose shape would differ from the mask's)."""
    outline = ((10.6, 10.6), (30.4, 10.6), (30.4, 30.4), (10.6, 30.4))  # cut to 10..31: 0.6 px inside
    tile = Tile(
        "src", Path("src.png"), np.full((48, 48, 3), 200, np.uint8), (polygon_box("tree", outline),), "0" * 64
    )
    instances = cut_instances([tile], CompositeParams(min_size=4), "segment")
    cut = instances[0].mask.shape
    assert cut == (21, 21)
    # Enlarged twice: the outline sits 1.2 px inside the placement.
    placement = Placement(0, 4, 4, 2 * cut[1], 2 * cut[0], 0, False, (1.0, 1.0, 1.0))
    _, labels = render_composite(flat_tile(64, 64), instances, [placement], CompositeParams())
    assert len(labels) == 1 and labels[0].polygon
    assert (labels[0].x0, labels[0].y0) == pytest.approx((4 + 2 * 0.6, 4 + 2 * 0.6))


# 6. Poisson blending ---------------------------------------------------------------------------


def test_poisson_blending_gives_other_pixels_and_the_same_labels(real: Path, tmp_path: Path) -> None:
    gaussian = compose(real, tmp_path / "gaussian", per_image=1)
    poisson = compose(real, tmp_path / "poisson", per_image=1, blend="poisson")
    assert [r["objects"] for r in poisson] == [r["objects"] for r in gaussian]
    for a, b in zip(gaussian, poisson, strict=True):
        assert (tmp_path / "poisson" / b["label"]).read_bytes() == (
            tmp_path / "gaussian" / a["label"]
        ).read_bytes()
        with (
            Image.open(tmp_path / "poisson" / b["file"]) as p,
            Image.open(tmp_path / "gaussian" / a["file"]) as g,
        ):
            assert p.size == g.size and p.tobytes() != g.tobytes()


# 7. Bad input ----------------------------------------------------------------------------------


def nothing_written(out: Path) -> bool:
    return not out.exists() or not any(out.rglob("*"))


def test_bad_input_is_refused_naming_the_param_or_file_and_writes_nothing(real: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    (empty / "images" / "train").mkdir(parents=True)
    with pytest.raises(GenfusionError, match=r"empty/images/train holds no train tiles"):
        compose(empty, out)

    unlabelled = tmp_path / "unlabelled"
    shutil.copytree(real, unlabelled)
    stem = sorted((unlabelled / "labels" / "train").iterdir())[-1].stem
    (unlabelled / "labels" / "train" / f"{stem}.txt").unlink()
    with pytest.raises(GenfusionError, match=rf"unlabelled/labels/train/{stem}\.txt is missing"):
        compose(unlabelled, out)

    tiles = load_tiles(real, NAMES)
    largest = max(max(t.size) for t in tiles)
    with pytest.raises(GenfusionError, match=rf"composite\.min_size \({largest + 1}\)"):
        compose(real, out, min_size=largest + 1)
    with pytest.raises(
        GenfusionError, match=r"does not fit .* lower composite\.scale \(now \[20\.0, 20\.0\]\)"
    ):
        compose(real, out, scale=(20, 20))
    assert nothing_written(out)
    # A refused request leaves an earlier output as it was.
    good = tmp_path / "good"
    compose(real, good, per_image=1)
    before = files(good)
    with pytest.raises(GenfusionError, match=r"composite\.scale"):
        compose(real, good, per_image=1, scale=(20, 20))
    assert files(good) == before

    with pytest.raises(ValidationError, match="scale is \\[min, max\\]"):
        CompositeParams(scale=(2, 1))
    with pytest.raises(ValidationError, match="max_occlusion"):
        CompositeParams(max_occlusion=1.5)


# 8. The composite dataset variant ---------------------------------------------------------------


def sources(real: Path, composites: Path, tmp_path: Path) -> Sources:
    return Sources(real=real, sets={"composite": composites})


def test_the_composite_dataset_adds_every_listed_composite_to_the_real_tiles(
    real: Path, tmp_path: Path
) -> None:
    composites = tmp_path / "composites"
    rows = compose(real, composites)
    (composites / "images" / "stray.png").write_bytes(b"")  # not in the manifest: not taken
    out = tmp_path / "dataset"
    counts = build_dataset("composite", sources(real, composites, tmp_path), out)
    tiles = sorted((real / "images" / "train").glob("*.png"))
    assert counts == json.loads((out / "counts.json").read_text())
    assert (counts["real_images"], counts["synthetic_images"]) == (len(tiles), len(rows))
    assert counts["train_images"] == len(tiles) + len(rows)
    linked = sorted((out / "images" / "train").iterdir())
    assert sorted(p.name for p in linked) == sorted(
        [t.name for t in tiles] + [Path(r["file"]).name for r in rows]
    )
    for image in linked:
        assert image.is_symlink() and not os.path.isabs(os.readlink(image))
    for row in rows:
        name = Path(row["file"])
        assert (out / "images" / "train" / name.name).resolve() == (composites / row["file"]).resolve()
        assert (out / "labels" / "train" / f"{name.stem}.txt").read_bytes() == (
            composites / row["label"]
        ).read_bytes()
    for tile in tiles:
        assert (out / "labels" / "train" / f"{tile.stem}.txt").read_bytes() == (
            real / "labels" / "train" / f"{tile.stem}.txt"
        ).read_bytes()
    boxes = sum(len(label_lines(p)) for p in (out / "labels" / "train").iterdir())
    assert counts["train_boxes"] == boxes

    with pytest.raises(GenfusionError, match=r"missing; run `dvc repro composite`"):
        build_dataset("composite", sources(real, tmp_path / "none", tmp_path), tmp_path / "other")
    assert not (tmp_path / "other").exists()


# 9. The command line ---------------------------------------------------------------------------


def test_the_command_writes_the_composites_of_the_params(
    real: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in THREAD_VARS:  # the command sets them for its process: restore them after
        monkeypatch.setenv(name, os.environ.get(name, "2"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["composite"].update(per_image=1, seed=5)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "composites"
    result = CliRunner().invoke(
        app, ["composite", "--real", str(real), "--out", str(out), "--params", str(tmp_path / "params.yaml")]
    )
    assert result.exit_code == 0, result.output
    rows = manifest(out)
    tiles = sorted((real / "images" / "train").glob("*.png"))
    assert [r["file"] for r in rows] == [f"images/{t.stem}_c0.png" for t in tiles]
    assert [int(r["seed"]) for r in rows] == [5 + s for s in range(len(tiles))]
    assert all((out / r["file"]).is_file() and (out / r["label"]).is_file() for r in rows)
    assert set(files(out)) == {MANIFEST} | {r["file"] for r in rows} | {r["label"] for r in rows}


def test_the_command_reports_bad_input_as_an_error_line_and_exit_status_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in THREAD_VARS:
        monkeypatch.setenv(name, os.environ.get(name, "2"))
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    (tmp_path / "real" / "images" / "train").mkdir(parents=True)
    out = tmp_path / "composites"
    argv = ["composite", "--real", str(tmp_path / "real"), "--out", str(out), "--params"]
    monkeypatch.setattr(sys, "argv", ["genfusion", *argv, str(tmp_path / "params.yaml")])
    with pytest.raises(SystemExit) as exited:
        cli_main()
    assert exited.value.code == 2
    assert re.search(r"error: .*real/images/train holds no train tiles", capsys.readouterr().err)
    assert nothing_written(out)
