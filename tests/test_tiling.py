from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageOps

from genfusion.boxes import Box
from genfusion.tiling import Window, assign_splits, boxes_in_window, exif_point, tile_boxes, tile_windows


def test_windows_cover_the_image_edge_to_edge() -> None:
    windows = tile_windows(1249, 1035, tile=320, overlap=64)
    xs = sorted({w.x0 for w in windows})
    ys = sorted({w.y0 for w in windows})
    assert xs == [0, 256, 512, 768, 929]
    assert ys == [0, 256, 512, 715]
    assert all(w.width == 320 and w.height == 320 for w in windows)
    covered = np.zeros((1035, 1249), bool)
    for w in windows:
        covered[w.y0 : w.y1, w.x0 : w.x1] = True
    assert covered.all()


def test_small_image_is_one_window_of_its_own_size() -> None:
    assert tile_windows(200, 150, tile=320, overlap=64) == [Window(0, 0, 200, 150)]
    # Larger than a tile in one direction only: tiled along that direction alone.
    assert [(w.x0, w.width, w.height) for w in tile_windows(500, 100, 320, 64)] == [
        (0, 320, 100),
        (180, 320, 100),
    ]


def test_box_cut_by_the_window_is_kept_by_visible_fraction() -> None:
    window = Window(100, 0, 200, 100)
    mostly_in = Box("tree", 90, 10, 130, 30)  # 30 of 40 px wide inside
    mostly_out = Box("tree", 70, 10, 110, 30)  # 10 of 40 px inside
    whole = Box("tree", 150, 50, 160, 60)
    elsewhere = Box("tree", 0, 0, 10, 10)
    cut = boxes_in_window(
        [mostly_in, mostly_out, whole, elsewhere], window, min_visibility=0.5, min_box_size=2
    )
    assert cut.boxes == (Box("tree", 0, 10, 30, 30), Box("tree", 50, 50, 60, 60))
    assert (cut.cut, cut.dropped) == (1, 1)


@pytest.mark.parametrize(("width", "height"), [(1249, 1035), (200, 150), (500, 100), (2000, 320)])
def test_indexed_tiling_keeps_what_checking_every_box_in_every_window_keeps(width: int, height: int) -> None:
    rng = np.random.default_rng(width)
    corners = rng.uniform(-30, [width + 30, height + 30], (400, 2))
    sides = rng.uniform(0, 90, (400, 2))
    # Boxes on window edges too: 256 is the stride, 320 the tile.
    edges = [Box("tree", 256, 0, 320, 40), Box("tree", 0, 256, 64, 320), Box("tree", 319.5, 5, 320.5, 9)]
    boxes = [Box("tree", *c, *(c + s)) for c, s in zip(corners, sides, strict=True)] + edges
    indexed = tile_boxes(boxes, (width, height), 320, 64, min_visibility=0.5, min_box_size=2)
    windows = tile_windows(width, height, 320, 64)
    assert [window for window, _ in indexed] == windows
    for (_, cut), window in zip(indexed, windows, strict=True):
        assert cut == boxes_in_window(boxes, window, min_visibility=0.5, min_box_size=2)


def test_sliver_below_min_box_size_is_dropped() -> None:
    sliver = Box("tree", 0, 0, 101, 50)  # 1 px inside the window, but 1% of it
    cut = boxes_in_window([sliver], Window(100, 0, 200, 100), min_visibility=0.0, min_box_size=2)
    assert cut.boxes == () and cut.dropped == 1


def test_split_keeps_groups_whole_and_is_deterministic() -> None:
    sizes = {"big": 20, "a": 4, "b": 4}
    fractions = {"train": 0.7, "val": 0.15, "test": 0.15}
    first = assign_splits(sizes, fractions, seed=0)
    assert first == assign_splits(sizes, fractions, seed=0)
    assert first["big"] == "train"
    assert {first["a"], first["b"]} == {"val", "test"}
    # Another seed may swap the two small scenes, never mix them into train.
    assert {assign_splits(sizes, fractions, seed=s)["a"] for s in range(20)} == {"val", "test"}


def test_split_of_many_equal_groups_follows_the_fractions() -> None:
    sizes = {f"tile{i}": 1 for i in range(100)}
    splits = assign_splits(sizes, {"train": 0.7, "val": 0.2, "test": 0.1}, seed=3)
    counts = {s: sum(v == s for v in splits.values()) for s in ("train", "val", "test")}
    assert counts == {"train": 70, "val": 20, "test": 10}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_point_matches_pil_exif_transpose(orientation: int) -> None:
    raw = np.zeros((4, 6, 3), np.uint8)
    raw[0, 1] = 255  # one marked pixel at x=1, y=0 of the stored image
    image = Image.fromarray(raw)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.info["exif"] = exif.tobytes()
    shown = np.asarray(ImageOps.exif_transpose(image))
    y, x = np.argwhere(shown[..., 0] == 255)[0]
    # Pixel centres map to pixel centres.
    assert exif_point(1.5, 0.5, 6, 4, orientation) == (x + 0.5, y + 0.5)


def test_as_many_scenes_as_splits_give_one_scene_each() -> None:
    splits = assign_splits({"a": 4, "b": 4, "c": 4}, {"train": 0.7, "val": 0.15, "test": 0.15}, seed=0)
    assert sorted(splits.values()) == ["test", "train", "val"]
