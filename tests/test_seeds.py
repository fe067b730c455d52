"""The seeds stage on the real NEON scenes and on hand-made bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from png_files import deep_png, write_png

from genfusion.boxes import Box, LabelledImage
from genfusion.errors import GenfusionError
from genfusion.formats import read_annotations
from genfusion.formats.yolo import parse_yolo_line
from genfusion.params import SeedsParams
from genfusion.stages.seeds import run_seeds

CLASS_MAP = {"Tree": "tree", "Alive": "tree", "Dead": "tree"}


def seeds_params(**overrides) -> SeedsParams:
    base = {"source": Path("unused"), "class_map": CLASS_MAP, "tile_size": 320, "tile_overlap": 64}
    return SeedsParams(**(base | overrides))


def read_tiles(out: Path) -> dict[str, tuple[str, list[Box]]]:
    """name -> (split, boxes in tile pixels) from what the stage wrote."""
    tiles = {}
    for label_file in sorted(out.glob("labels/*/*.txt")):
        split = label_file.parent.name
        with Image.open(out / "images" / split / f"{label_file.stem}.png") as image:
            width, height = image.size
        boxes = [
            parse_yolo_line(line, ["tree"], width, height) for line in label_file.read_text().splitlines()
        ]
        tiles[label_file.stem] = (split, boxes)
    return tiles


def visible_count(boxes: np.ndarray, x0: int, y0: int, size: int, min_visibility: float) -> int:
    """Independent count of boxes at least `min_visibility` inside a window (numpy, not the stage)."""
    ix = np.clip(boxes[:, 2], x0, x0 + size) - np.clip(boxes[:, 0], x0, x0 + size)
    iy = np.clip(boxes[:, 3], y0, y0 + size) - np.clip(boxes[:, 1], y0, y0 + size)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    inside = ix * iy
    return int(((inside > 0) & (inside >= min_visibility * area) & (np.minimum(ix, iy) >= 2)).sum())


@pytest.fixture(scope="module")
def neon_items(neon_seeds: Path) -> list[LabelledImage]:
    return read_annotations(neon_seeds)


def test_known_scenes_give_known_tiles_and_boxes(neon_items, tmp_path: Path) -> None:
    out = tmp_path / "real"
    report = run_seeds(neon_items, seeds_params(), ["tree"], out)
    # 1249 x 1035 at tile 320 / stride 256: 5 x 4 tiles; each 400 x 400 scene: 2 x 2.
    assert sum(report["tiles"].values()) == 20 + 4 + 4
    assert report["scenes_per_split"] == {"train": 1, "val": 1, "test": 1}
    assert report["tiles"]["train"] == 20  # the big scene alone fills the train share
    expected = 0
    for item in neon_items:
        boxes = np.array([[b.x0, b.y0, b.x1, b.y1] for b in item.boxes])
        xs = [0, 256, 512, 768, 929] if item.size[0] > 400 else [0, 80]
        ys = [0, 256, 512, 715] if item.size[0] > 400 else [0, 80]
        expected += sum(visible_count(boxes, x, y, 320, 0.5) for x in xs for y in ys)
    assert report["boxes"]["read"] == 61 + 37 + 279
    assert report["boxes"]["written"] == expected
    assert sum(len(b) for _, b in read_tiles(out).values()) == expected
    manifest = (out / "manifest.csv").read_text().splitlines()
    assert len(manifest) == 1 + 28 and manifest[0] == "image,scene,split,boxes,width,height,x0,y0"


def test_boxes_round_trip_through_yolo_labels(neon_items, tmp_path: Path) -> None:
    out = tmp_path / "real"
    run_seeds(neon_items, seeds_params(tile_size=400, tile_overlap=0), ["tree"], out)
    tiles = read_tiles(out)
    for item in neon_items:
        if item.size != (400, 400):
            continue  # a 400 px scene is one whole tile: every box must come back
        _, boxes = tiles[item.image.stem]
        original = sorted((b.x0, b.y0, b.x1, b.y1) for b in item.boxes)
        # Sorted after rounding: float noise of the normalised form would reorder equal rows.
        back = sorted(tuple(round(v, 2) for v in (b.x0, b.y0, b.x1, b.y1)) for b in boxes)
        assert np.allclose(back, original, atol=1e-3)


def test_ultralytics_reads_what_seeds_writes(neon_items, tmp_path: Path) -> None:
    from genfusion.integrations.ultralytics import configure_offline

    configure_offline()
    from ultralytics.data.dataset import YOLODataset
    from ultralytics.data.utils import check_det_dataset

    out = tmp_path / "real"
    report = run_seeds(neon_items, seeds_params(), ["tree"], out)
    data = check_det_dataset(str(out / "dataset.yaml"))
    for split in ("train", "val", "test"):
        dataset = YOLODataset(img_path=data[split], data=data, task="detect", augment=False, imgsz=320)
        assert len(dataset.labels) == report["tiles"][split]
        assert sum(len(label["bboxes"]) for label in dataset.labels) == report["boxes_per_split"][split]


def test_same_input_gives_identical_files(neon_items, tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    run_seeds(neon_items, seeds_params(), ["tree"], first)
    run_seeds(neon_items, seeds_params(), ["tree"], second)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)


# --- hand-made scenes -------------------------------------------------------------------


def scene(
    folder: Path,
    name: str,
    pixels: np.ndarray | Image.Image,
    boxes: list[Box],
    size: tuple[int, int] | None = None,
) -> LabelledImage:
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    path = folder / f"{name}.png"
    image.save(path)
    return LabelledImage(path, tuple(boxes), size, folder / f"{name}.xml")


def rgb(seed: int, width: int = 64, height: int = 48) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def three_scenes(folder: Path, extra: list[Box] = ()) -> list[LabelledImage]:
    return [scene(folder, f"s{i}", rgb(i), [Box("Tree", 5, 5, 20, 20), *extra]) for i in range(3)]


def test_boxes_outside_the_image_are_clipped_and_zero_area_dropped(tmp_path: Path) -> None:
    items = three_scenes(tmp_path, [Box("Tree", -10, 30, 10, 60), Box("Tree", 8, 8, 8, 30)])
    report = run_seeds(items, seeds_params(), ["tree"], tmp_path / "out")
    assert report["boxes"]["clipped_to_image"] == 3
    assert report["boxes"]["dropped_zero_area"] == 3
    assert report["boxes"]["written"] == 6
    for _, boxes in read_tiles(tmp_path / "out").values():
        clipped = [b for b in boxes if b.x0 == 0]
        assert len(clipped) == 1 and clipped[0].y1 == pytest.approx(48, abs=1e-3)


def opaque(a: np.ndarray) -> np.ndarray:
    return np.dstack([a, np.full(a.shape[:2], np.iinfo(a.dtype).max, a.dtype)])


@pytest.mark.parametrize(
    ("mode", "make", "kinds"),
    [
        ("RGBA", lambda a: Image.fromarray(opaque(a)), ["alpha"]),
        ("L", lambda a: Image.fromarray(a[..., 0]), ["grayscale"]),
        ("I;16", lambda a: Image.fromarray(a[..., 0].astype(np.uint16) * 257), ["16bit", "grayscale"]),
        ("P", lambda a: Image.fromarray(a).quantize(16), ["p"]),
        # Pillow opens 16-bit colour PNGs as 8-bit modes: only the decoder says they were reduced.
        ("RGB", lambda a: deep_png(a.astype(np.uint16) * 257), ["16bit"]),
        ("RGBA", lambda a: deep_png(opaque(a.astype(np.uint16) * 257)), ["16bit", "alpha"]),
    ],
)
def test_every_conversion_that_changes_pixels_is_counted_by_kind(tmp_path: Path, mode, make, kinds) -> None:
    from genfusion.scene_images import open_scene

    items = three_scenes(tmp_path)
    pixels = rgb(7)
    made = make(pixels)
    items[0] = scene(
        tmp_path, "odd", pixels if isinstance(made, bytes) else made, [Box("Tree", 5, 5, 20, 20)]
    )
    if isinstance(made, bytes):
        items[0].image.write_bytes(made)
    assert Image.open(items[0].image).mode == mode
    report = run_seeds(items, seeds_params(), ["tree"], tmp_path / "out")
    assert report["images_converted"] == dict.fromkeys(sorted(kinds), 1)
    written = next((tmp_path / "out" / "images").glob("*/odd.png"))
    converted = np.asarray(Image.open(written))
    assert converted.shape == (48, 64, 3)
    if kinds != ["p"]:  # exact: opaque alpha, and 16-bit 257*v back to v
        expected = np.repeat(pixels[..., :1], 3, axis=2) if "grayscale" in kinds else pixels
        assert np.array_equal(converted, expected)
    # `genfusion predict` and the test sets read scenes the same way, and see the same conversions.
    scene_read = open_scene(items[0].image, None)
    assert sorted(scene_read.conversions) == sorted(kinds)
    scene_read.close()


def test_exif_rotated_image_turns_boxes_annotated_on_stored_pixels(tmp_path: Path) -> None:
    stored = Image.fromarray(rgb(1, width=64, height=48))
    exif = stored.getexif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: 48 wide, 64 high
    path = tmp_path / "rot.png"
    stored.save(path, exif=exif.tobytes())
    raw_frame = LabelledImage(path, (Box("Tree", 10, 5, 20, 15),), (64, 48), path)
    shown_frame = LabelledImage(path, (Box("Tree", 10, 5, 20, 15),), (48, 64), path)
    others = three_scenes(tmp_path)[:2]
    for item, expected in ((raw_frame, (33, 10, 43, 20)), (shown_frame, (10, 5, 20, 15))):
        run_seeds([item, *others], seeds_params(), ["tree"], tmp_path / "out")
        ((split, boxes),) = [v for k, v in read_tiles(tmp_path / "out").items() if k == "rot"]
        assert np.allclose([boxes[0].x0, boxes[0].y0, boxes[0].x1, boxes[0].y1], expected, atol=1e-3)


# --- errors: each names the file and the problem, and writes nothing ----------------------


def test_unknown_class_lists_the_known_ones(tmp_path: Path) -> None:
    items = three_scenes(tmp_path, [Box("Oak", 1, 1, 9, 9)])
    with pytest.raises(
        GenfusionError, match=r"s0\.xml: class 'Oak' is not in seeds\.class_map \(known: Alive, Dead, Tree\)"
    ):
        run_seeds(items, seeds_params(), ["tree"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.write_bytes(b"this is not a png"), r"bad\.png: not a readable image"),
        (
            lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
            r"bad\.png: corrupt or truncated image",
        ),
    ],
)
def test_unreadable_image_is_named_and_previous_output_kept(tmp_path: Path, damage, message) -> None:
    out = tmp_path / "out"
    items = three_scenes(tmp_path)
    run_seeds(items, seeds_params(), ["tree"], out)
    before = sorted(p.name for p in out.rglob("*"))
    bad = scene(tmp_path, "bad", rgb(9, 256, 256), [Box("Tree", 5, 5, 20, 20)])
    damage(bad.image)
    with pytest.raises(GenfusionError, match=message):
        run_seeds([*items, bad], seeds_params(), ["tree"], out)
    assert sorted(p.name for p in out.rglob("*")) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_declared_size_mismatch_is_an_error(tmp_path: Path) -> None:
    items = three_scenes(tmp_path)
    items[1] = LabelledImage(items[1].image, items[1].boxes, (640, 480), items[1].source)
    with pytest.raises(GenfusionError, match=r"s1\.xml: declares image size 640x480 but .*s1\.png is 64x48"):
        run_seeds(items, seeds_params(), ["tree"], tmp_path / "out")


def test_empty_split_says_why_and_what_to_do(tmp_path: Path) -> None:
    items = three_scenes(tmp_path)[:2]
    with pytest.raises(
        GenfusionError, match=r"split \['test'\] would be empty: 2 scenes cannot fill .*split_by: tile"
    ):
        run_seeds(items, seeds_params(), ["tree"], tmp_path / "out")


def test_tile_smaller_than_every_box_is_an_error(tmp_path: Path) -> None:
    items = [scene(tmp_path, f"s{i}", rgb(i, 200, 200), [Box("Tree", 10, 10, 150, 150)]) for i in range(3)]
    with pytest.raises(
        GenfusionError, match=r"seeds\.tile_size \(100\) is smaller than every box \(the smallest is 140 px"
    ):
        run_seeds(items, seeds_params(tile_size=100, tile_overlap=10), ["tree"], tmp_path / "out")


def test_report_is_json_serialisable(tmp_path: Path) -> None:
    report = run_seeds(three_scenes(tmp_path), seeds_params(), ["tree"], tmp_path / "out")
    assert json.loads(json.dumps(report)) == report


def test_the_test_split_is_written_whole_each_object_once(neon_items, tmp_path: Path) -> None:
    report = run_seeds(
        neon_items, seeds_params(), ["tree"], tmp_path / "real", scenes_out=tmp_path / "scenes"
    )
    truth = json.loads((tmp_path / "scenes/annotations.json").read_text())
    (image,) = truth["images"]
    test_scene = next(item for item in neon_items if item.image.stem == Path(image["file_name"]).stem)
    with (
        Image.open(tmp_path / "scenes" / image["file_name"]) as written,
        Image.open(test_scene.image) as source,
    ):
        assert written.size == (image["width"], image["height"]) == source.size
        assert (np.asarray(written) == np.asarray(source.convert("RGB"))).all()
    # Each object once (61 in OSBS_029), though the overlapping test tiles hold more boxes.
    assert len(truth["annotations"]) == len(test_scene.boxes)
    assert report["boxes_per_split"]["test"] > len(test_scene.boxes)
    first, box = truth["annotations"][0], test_scene.boxes[0]
    assert first["bbox"] == pytest.approx([box.x0, box.y0, box.x1 - box.x0, box.y1 - box.y0])
    assert first["category_id"] == 1 and truth["categories"] == [{"id": 1, "name": "tree"}]


def test_split_by_tile_scores_each_test_tile_as_a_scene(neon_items, tmp_path: Path) -> None:
    run_seeds(
        neon_items, seeds_params(split_by="tile"), ["tree"], tmp_path / "real", scenes_out=tmp_path / "scenes"
    )
    truth = json.loads((tmp_path / "scenes/annotations.json").read_text())
    test_tiles = sorted(p.stem for p in (tmp_path / "real/images/test").glob("*.png"))
    assert sorted(Path(i["file_name"]).stem for i in truth["images"]) == test_tiles
    labelled = sum(len((tmp_path / f"real/labels/test/{t}.txt").read_text().splitlines()) for t in test_tiles)
    assert len(truth["annotations"]) == labelled


def test_a_held_out_test_scene_is_the_test_split(neon_items, tmp_path: Path) -> None:
    for scene in ("SOAP_061", "2019_YELL_2_541000_4977000_image_crop"):
        out = tmp_path / scene
        report = run_seeds(
            neon_items, seeds_params(test_scene=scene), ["tree"], out / "real",
            scenes_out=out / "scenes", val_scenes_out=out / "val",
        )  # fmt: skip
        assert report["scenes_per_split"] == {"train": 1, "val": 1, "test": 1}
        assert all(p.stem.startswith(scene) for p in (out / "real/images/test").glob("*.png"))
        truth = json.loads((out / "scenes/annotations.json").read_text())
        assert [i["file_name"] for i in truth["images"]] == [f"images/{scene}.png"]
        # The val split whole too: the one other scene whose tiles are all in val, each tree once.
        (val,) = json.loads((out / "val/annotations.json").read_text())["images"]
        val_scene = Path(val["file_name"]).stem
        val_tiles = {p.stem.rsplit("_", 2)[0] for p in (out / "real/images/val").glob("*.png")}
        assert val_scene != scene and val_tiles == {val_scene}
    with pytest.raises(GenfusionError, match=r"seeds.test_scene: no scene named 'nowhere'.*OSBS_029"):
        run_seeds(neon_items, seeds_params(test_scene="nowhere"), ["tree"], tmp_path / "x")
    with pytest.raises(ValueError, match="needs split_by: scene"):
        seeds_params(test_scene="SOAP_061", split_by="tile")


def test_an_extra_test_set_is_imported_whole_and_checked_like_the_seeds(
    neon_seeds: Path, tmp_path: Path
) -> None:
    from genfusion.params import load_params
    from genfusion.stages.test_set import main

    source = tmp_path / "site"
    source.mkdir()
    for suffix in (".png", ".xml"):
        (source / f"SOAP_061{suffix}").write_bytes((neon_seeds / f"SOAP_061{suffix}").read_bytes())
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    main(params, name="site", source=source, out=tmp_path / "scenes/site")
    truth = json.loads((tmp_path / "scenes/site/annotations.json").read_text())
    assert [i["file_name"] for i in truth["images"]] == ["images/SOAP_061.png"]
    assert len(truth["annotations"]) == 37  # Alive and Dead, both mapped to tree
    xml = (source / "SOAP_061.xml").read_text().replace("<name>Dead</name>", "<name>Stump</name>")
    (source / "SOAP_061.xml").write_text(xml)
    with pytest.raises(GenfusionError, match=r"SOAP_061\.xml: class 'Stump' is not in seeds.class_map"):
        main(params, name="site", source=source, out=tmp_path / "scenes/other")
    assert not (tmp_path / "scenes/other").exists()


# --- large scenes -----------------------------------------------------------------------------


def write_ortho(path: Path, width: int, height: int, crs: str | None = "EPSG:32617") -> None:
    """A tiled 8-bit RGB GeoTIFF whose pixels say where they are (so a misplaced window shows),
    written a band of rows at a time."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    georef = {"crs": crs, "transform": from_origin(400000, 3300000, 0.1, 0.1)} if crs else {}
    with rasterio.open(
        path, "w", driver="GTiff", width=width, height=height, count=3, dtype="uint8", tiled=True,
        blockxsize=512, blockysize=512, compress="deflate", **georef,
    ) as target:  # fmt: skip
        x = np.arange(width)
        for y0 in range(0, height, 1024):
            y = np.arange(y0, min(y0 + 1024, height))[:, None]
            bands = np.stack([(x // 61 + y // 67) % 256, (x // 509) % 256 + 0 * y, (y // 503) % 256 + 0 * x])
            target.write(bands.astype(np.uint8), window=Window(0, y0, width, len(y)))


def test_a_scene_over_pillows_limit_imports_window_by_window(tmp_path: Path) -> None:
    """14,000 x 13,000 px (182 megapixels): over the size Pillow refuses to open, under
    seeds.max_pixels; read and copied a window at a time, its CRS kept in the test scene copy."""
    import rasterio

    ortho = tmp_path / "ortho.tif"
    write_ortho(ortho, 14000, 13000)
    boxes = [
        Box("Tree", x, y, x + 40, y + 30) for x in range(100, 13900, 1500) for y in range(100, 12900, 1400)
    ]
    item = LabelledImage(ortho, tuple(boxes), (14000, 13000), tmp_path / "ortho.json")
    params = seeds_params(tile_size=2048, tile_overlap=64, split_by="tile")
    out, scenes = tmp_path / "real", tmp_path / "scenes"
    report = run_seeds([item], params, ["tree"], out, scenes_out=scenes)
    assert sum(report["tiles"].values()) == 8 * 7
    assert sum(report["boxes_per_split"].values()) >= len(boxes)
    with rasterio.open(ortho) as source:
        for tile in sorted(out.glob("images/*/ortho_x*.png"))[::9]:
            x0, y0 = (int(part[1:]) for part in tile.stem.split("_")[1:])
            written = np.asarray(Image.open(tile))
            window = rasterio.windows.Window(x0, y0, written.shape[1], written.shape[0])
            assert np.array_equal(written, np.moveaxis(source.read(window=window), 0, -1))


def test_a_held_out_large_scene_is_copied_as_a_tiled_geotiff_with_its_crs(tmp_path: Path) -> None:
    import rasterio

    items = three_scenes(tmp_path)
    ortho = tmp_path / "ortho.tif"
    write_ortho(ortho, 3000, 2000)
    items.append(LabelledImage(ortho, (Box("Tree", 10, 10, 50, 50),), None, tmp_path / "ortho.json"))
    scenes = tmp_path / "scenes"
    run_seeds(items, seeds_params(test_scene="ortho"), ["tree"], tmp_path / "real", scenes_out=scenes)
    truth = json.loads((scenes / "annotations.json").read_text())
    assert [image["file_name"] for image in truth["images"]] == ["images/ortho.tif"]
    with rasterio.open(scenes / "images" / "ortho.tif") as copy, rasterio.open(ortho) as source:
        assert copy.crs == source.crs and copy.transform == source.transform
        assert copy.profile["tiled"] and copy.count == 3
        assert np.array_equal(copy.read(), source.read())


def test_an_image_over_max_pixels_is_refused_naming_file_size_and_param(tmp_path: Path) -> None:
    items = three_scenes(tmp_path)  # 64 x 48 px each: 3,072 pixels
    with pytest.raises(GenfusionError) as refused:
        run_seeds(items, seeds_params(max_pixels=3000), ["tree"], tmp_path / "out")
    message = str(refused.value)
    assert (
        str(items[0].image) in message and "64 x 48 px" in message and "seeds.max_pixels (3,000)" in message
    )
    assert "tiled GeoTIFF" in message
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_stale_scratch_of_a_killed_import_is_removed(neon_items, tmp_path: Path) -> None:
    out = tmp_path / "real"
    stale = tmp_path / ".real.tmp" / "images" / "train"
    stale.mkdir(parents=True)
    (stale / "half-written.png").write_bytes(b"\x89PNG")
    run_seeds(neon_items, seeds_params(), ["tree"], out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["real"]


def test_the_orientation_of_a_png_with_exif_after_its_pixels_is_read_without_decoding(tmp_path: Path) -> None:
    from genfusion.images import read_header

    exif = Image.Exif()
    exif[0x0112] = 6  # turned a quarter: displayed as height x width
    path = tmp_path / "late-exif.png"
    write_png(path, 40, 30, exif.tobytes())
    header = read_header(path)
    assert (header.raw_size, header.orientation, header.size) == ((40, 30), 6, (30, 40))
    with Image.open(path) as image:  # Pillow, decoding the image, finds the same orientation
        assert image.getexif()[0x0112] == 6
    plain = tmp_path / "plain.png"
    write_png(plain, 40, 30)
    assert read_header(plain).orientation == 1


# Run in a fresh process, which reports how far its peak memory rose over the refusals.
REFUSE_OVERSIZED = """
import resource, sys
from pathlib import Path
from genfusion.boxes import Box, LabelledImage
from genfusion.errors import GenfusionError
from genfusion.params import SeedsParams
from genfusion.scene_images import open_scene
from genfusion.stages.seeds import run_seeds

path, out = Path(sys.argv[1]), Path(sys.argv[2])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
params = SeedsParams(source=path.parent, class_map={"Tree": "tree"}, max_pixels=100_000_000)
scenes = [path, *sorted(path.parent.glob("small-*.png"))]  # enough scenes to split
messages = []
try:  # the seeds stage (a test set's import reads scenes the same way)
    run_seeds([LabelledImage(p, (Box("Tree", 5, 5, 50, 50),)) for p in scenes], params, ["tree"], out)
except GenfusionError as exc:
    messages.append(str(exc))
try:  # genfusion predict
    open_scene(path, params.max_pixels)
except GenfusionError as exc:
    messages.append(str(exc))
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print("grown MB:", grown // 1024)
print("\\n".join(f"refused: {m}" for m in messages))
"""


def test_an_oversized_png_is_refused_before_it_is_decoded(tmp_path: Path) -> None:
    """A highly compressed PNG over seeds.max_pixels is refused from its header: the process grows
    by well under the 546 MB its pixels would take."""
    import subprocess
    import sys

    path = tmp_path / "ortho.png"
    write_png(path, 14_000, 13_000)
    assert path.stat().st_size < 5_000_000
    for k in range(2):
        write_png(tmp_path / f"small-{k}.png", 64, 64)
    done = subprocess.run(
        [sys.executable, "-c", REFUSE_OVERSIZED, str(path), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = done.stdout.splitlines()
    (grown_mb,) = [line.removeprefix("grown MB: ") for line in lines if line.startswith("grown MB: ")]
    messages = [line for line in lines if line.startswith("refused: ")]
    assert len(messages) == 2
    for message in messages:
        assert f"{path}: 14000 x 13000 px (182 megapixels) is over seeds.max_pixels (100,000,000)" in message
    assert int(grown_mb) < 100, f"peak memory grew by {grown_mb} MB while refusing"
    assert not (tmp_path / "out").exists()


@pytest.mark.integration
def test_a_run_killed_between_its_two_outputs_leaves_a_mix_that_evaluation_refuses(
    neon_seeds: Path, tmp_path: Path
) -> None:
    """`seeds` writes the real tiles, then the test scenes: killed in between, the tiles are new
    and the scenes old. Both carry the import they come from, so evaluation refuses to score a
    detector on the mix, and the next run repairs it."""
    import signal
    import subprocess
    import sys

    import killed_genfusion
    import yaml

    from genfusion import layout
    from genfusion.scenes import read_scene_set

    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params["seeds"]["source"] = str(neon_seeds)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    seeds = ["seeds", "--out", "data/real", "--scenes", "data/scenes/test", "--report", "import.json"]
    seeds += ["--val-scenes", "data/scenes/val"]
    cli = [sys.executable, "-c", "from genfusion.cli import main; main()"]

    def run(command: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)

    def imports() -> tuple[str, str]:
        test, val = (
            read_scene_set(tmp_path / "data/scenes" / split).ground_truth["info"][layout.GENERATION]
            for split in ("test", "val")
        )
        assert test == val
        return layout.dataset_generation(tmp_path / "data/real"), test

    assert run([*cli, *seeds]).returncode == 0
    first, scenes = imports()
    assert first == scenes and len(first) == 16

    params["seeds"]["tile_size"] = 256  # another import: other tiles
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    kill = killed_genfusion.command("after", "genfusion.stages.seeds.write_real_dataset", 1)
    assert run([*kill, *seeds]).returncode == -signal.SIGKILL
    tiles, scenes = imports()
    assert tiles != first and scenes == first

    evaluate = [*cli, "evaluate", "--weights", "never-read.pt", "--scenes", "data/scenes/test"]
    evaluate += ["--real", "data/real", "--variant", "real", "--seed", "0"]
    evaluate += ["--out", "eval.json", "--detections", "detections.json"]
    refused = run(evaluate)
    assert refused.returncode == 2
    (line,) = refused.stderr.strip().splitlines()
    assert "come from different runs of the seeds stage" in line and "run `dvc repro seeds`" in line
    assert not (tmp_path / "eval.json").exists()

    assert run([*cli, *seeds]).returncode == 0
    tiles, scenes = imports()
    assert tiles == scenes != first
