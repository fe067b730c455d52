"""Sliced prediction and `genfusion predict`: merging against SAHI's, and the command run for real
with a tiny detector trained on the bundled seeds, over scenes larger than a slice (PNG, GeoTIFF)."""

from __future__ import annotations

import csv
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from png_files import deep_png

from genfusion.errors import GenfusionError
from genfusion.formats import read_annotations
from genfusion.layout import DATASET_YAML, Sources
from genfusion.params import load_params
from genfusion.prediction import Detections, greedy_groups, merge
from genfusion.scene_images import PillowScene, RasterScene
from genfusion.stages.datasets import build_dataset
from genfusion.stages.seeds import run_seeds
from genfusion.stages.train import train_detector
from genfusion.tiling import tile_windows

ROOT = Path(__file__).resolve().parents[1]
CRS = "EPSG:32617"
ORIGIN = (400000.0, 3280000.0)  # map coordinates of the top-left pixel corner
PIXEL = 0.1  # metres


# Merging against SAHI's greedy rule


def random_detections(seed: int) -> Detections:
    """A few hundred boxes of three classes, as overlapping slices make them: each object seen
    several times, shifted a little or cut by a slice edge, among unrelated boxes."""
    rng = np.random.default_rng(seed)
    boxes = []
    for _ in range(100):
        x0, y0 = rng.uniform(0, 300, 2)
        x1, y1 = x0 + rng.uniform(8, 60), y0 + rng.uniform(8, 60)
        for _ in range(rng.integers(1, 5)):
            seen = np.array([x0, y0, x1, y1]) + rng.normal(0, 1, 4)
            if rng.random() < 0.4:  # cut by a slice edge on one side
                side = rng.integers(4)
                cut = rng.uniform(0.3, 0.9)
                low, high = seen[side % 2], seen[side % 2 + 2]
                if side < 2:
                    seen[side + 2] = low + cut * (high - low)
                else:
                    seen[side - 2] = high - cut * (high - low)
            boxes.append(seen)
    for _ in range(80):
        x0, y0 = rng.uniform(0, 300, 2)
        boxes.append([x0, y0, x0 + rng.uniform(5, 80), y0 + rng.uniform(5, 80)])
    boxes = np.array(boxes, dtype=float)
    order = rng.permutation(len(boxes))
    boxes = boxes[order]
    return Detections(boxes, rng.uniform(0.05, 1.0, len(boxes)), rng.integers(0, 3, len(boxes)))


def sahi_rows(found: Detections) -> np.ndarray:
    return np.column_stack([found.boxes, found.scores, found.classes.astype(float)])


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.8])
@pytest.mark.parametrize("metric", ["iou", "ios"])
def test_merging_keeps_the_boxes_and_groups_sahi_keeps(metric: str, threshold: float) -> None:
    from sahi.postprocess.combine import batched_greedy_nmm, batched_nms

    found = random_detections(seed=7)
    assert len(found) > 250
    rows = sahi_rows(found)

    kept = batched_nms(rows, match_metric=metric.upper(), match_threshold=threshold)
    merged = merge(found, "nms", metric, threshold)
    # Both list the kept boxes best first.
    np.testing.assert_array_equal(merged.boxes, found.boxes[kept])
    np.testing.assert_array_equal(merged.scores, found.scores[kept])
    np.testing.assert_array_equal(merged.classes, found.classes[kept])
    assert len(kept) <= len(found) - 10, "too few duplicates to compare anything"

    sahi_groups = batched_greedy_nmm(rows, match_metric=metric.upper(), match_threshold=threshold)
    groups = greedy_groups(found, metric, threshold)
    assert {int(g[0]): sorted(int(i) for i in g[1:]) for g in groups} == {
        keeper: sorted(members) for keeper, members in sahi_groups.items()
    }
    assert sum(len(members) >= 1 for members in sahi_groups.values()) >= 10
    assert sorted(int(g[0]) for g in groups) == sorted(kept)


@pytest.mark.parametrize(
    ("metric", "duplicate"),
    [
        ("iou", [0.0, 0.0, 2.0, 2.0]),  # intersection 4, union 8
        ("ios", [2.0, 0.0, 6.0, 4.0]),  # intersection 8, smaller box 16
    ],
)
def test_boxes_exactly_at_the_match_threshold_are_duplicates_as_in_sahi(
    metric: str, duplicate: list[float]
) -> None:
    from sahi.postprocess.combine import batched_greedy_nmm

    first = [0.0, 0.0, 4.0, 2.0] if metric == "iou" else [0.0, 0.0, 4.0, 4.0]
    found = Detections(np.array([first, duplicate]), np.array([0.9, 0.6]), np.array([0, 0]))
    sahi_groups = batched_greedy_nmm(sahi_rows(found), match_metric=metric.upper(), match_threshold=0.5)
    groups = greedy_groups(found, metric, 0.5)
    assert {int(g[0]): [int(i) for i in g[1:]] for g in groups} == sahi_groups == {0: [1]}
    # Just above the overlap, neither merges.
    groups = greedy_groups(found, metric, 0.501)
    assert [len(g) for g in groups] == [1, 1]
    assert batched_greedy_nmm(sahi_rows(found), metric.upper(), 0.501) == {0: [], 1: []}


def test_merging_joins_a_crown_cut_by_a_slice_edge() -> None:
    # One slice ends at x=320 and sees the left part of a crown; the next slice sees it whole.
    whole = [300.0, 100.0, 360.0, 150.0]
    cut = [300.0, 100.0, 320.0, 150.0]
    other_class = [301.0, 101.0, 359.0, 149.0]
    elsewhere = [10.0, 10.0, 40.0, 40.0]
    boxes = np.array([whole, cut, other_class, elsewhere])
    scores = np.array([0.7, 0.8, 0.5, 0.4])
    found = Detections(boxes, scores, np.array([0, 0, 1, 0]))

    joined = merge(found, "nmm", "ios", 0.5)
    assert len(joined) == 3
    np.testing.assert_array_equal(joined.boxes[0], [*np.minimum(whole, cut)[:2], *np.maximum(whole, cut)[2:]])
    assert joined.scores[0] == max(scores[:2])
    np.testing.assert_array_equal(joined.boxes[1:], boxes[[2, 3]])  # other class, elsewhere: alone
    np.testing.assert_array_equal(joined.classes, [0, 1, 0])

    averaged = merge(found, "wbf", "ios", 0.5)
    expected = (scores[0] * boxes[0] + scores[1] * boxes[1]) / (scores[0] + scores[1])
    np.testing.assert_allclose(averaged.boxes[0], expected)
    assert averaged.scores[0] == max(scores[:2])

    best = merge(found, "nms", "ios", 0.5)
    np.testing.assert_array_equal(best.boxes[0], cut)  # the best-scored box, cut or not
    np.testing.assert_array_equal(best.scores, [0.8, 0.5, 0.4])

    # By IoU (20 x 50 over 60 x 50) the cut part is no duplicate: the crown stays two boxes.
    assert len(merge(found, "nmm", "iou", 0.5)) == 4


# `genfusion predict` with a tiny real detector


@pytest.fixture(scope="module")
def detector(neon_seeds: Path, train_seed: int, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny detector trained for real (3 epochs at 64 px) on the dataset the seeds make, with its
    params file. predict.conf 0: every anchor's box is a candidate, so the detector finds boxes in
    every slice whatever a few seconds of training taught it (its best scores are about 0.01,
    whatever the seed)."""
    root = tmp_path_factory.mktemp("predict")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"].update(epochs=3, imgsz=64, batch=4, nbs=4, workers=0, close_mosaic=0, device="cpu")
    params["predict"].update(slice=320, overlap=64, merge="nms", conf=0.0)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    loaded = load_params(root / "params.yaml")
    run_seeds(read_annotations(neon_seeds), loaded.seeds, loaded.classes, root / "data/real")
    build_dataset("real", Sources(real=root / "data/real"), root / "data/datasets/real")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)  # dvclive looks for a DVC repo from the working folder: not the project's
        weights = train_detector(
            root / "data/datasets/real" / DATASET_YAML, root / "models/real-0", root / "live/real-0",
            loaded.train, seed=train_seed,
        )  # fmt: skip
    tiles = sorted((root / "data/real/images").rglob("*.png"))
    return {"root": root, "weights": weights, "params": root / "params.yaml", "tiles": tiles}


def scene_pixels(tiles: list[Path], width: int, height: int) -> np.ndarray:
    """A scene of the real tiles laid side by side, row by row, cut to size."""
    pixels = [np.asarray(Image.open(p).convert("RGB")) for p in tiles]
    side = pixels[0].shape[0]
    scene = np.zeros((height, width, 3), np.uint8)
    for n, (y, x) in enumerate((y, x) for y in range(0, height, side) for x in range(0, width, side)):
        tile = pixels[n % len(pixels)]
        scene[y : y + side, x : x + side] = tile[: height - y, : width - x]
    return scene


@pytest.fixture(scope="module")
def big_scene(detector: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("scenes") / "scene.png"
    Image.fromarray(scene_pixels(detector["tiles"], 4000, 4000)).save(path)
    return path


def run_cli(patch: pytest.MonkeyPatch, args: list, capsys: pytest.CaptureFixture | None = None) -> tuple:
    """`genfusion ARGS...` through the console script's entry point: its exit code and stderr."""
    from genfusion.cli import main

    patch.delenv("GENFUSION_DEBUG", raising=False)
    patch.setattr(sys, "argv", ["genfusion", *map(str, args)])
    if capsys:
        capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    return code, capsys.readouterr().err if capsys else ""


def predict_args(detector: dict, out: Path, *images: Path, **options: Path) -> list:
    options = {"weights": detector["weights"], "params": detector["params"]} | options
    return ["predict", *images, "--out", out, "--weights", options["weights"], "--params", options["params"]]


def predict(monkeypatch, capsys, detector: dict, out: Path, *images: Path) -> None:
    code, err = run_cli(monkeypatch, predict_args(detector, out, *images), capsys)
    assert code == 0, err


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    with path.open() as f:
        assert f.readline().strip() == "image,xmin,ymin,xmax,ymax,label,score"
    return rows


def corners(row: dict) -> list[float]:
    return [float(row[k]) for k in ("xmin", "ymin", "xmax", "ymax")]


def check_outputs(out: Path, sizes: dict[str, tuple[int, int]]) -> tuple[dict, list[dict]]:
    """predictions.json (COCO) and predictions.csv tell the same boxes, all inside their image."""
    coco = json.loads((out / "predictions.json").read_text())
    rows = read_csv(out / "predictions.csv")
    assert {Path(i["file_name"]).name: (i["width"], i["height"]) for i in coco["images"]} == sizes
    names = {c["id"]: c["name"] for c in coco["categories"]}
    files = {i["id"]: i["file_name"] for i in coco["images"]}
    assert len(rows) == len(coco["annotations"])
    for annotation, row in zip(coco["annotations"], rows, strict=True):
        x, y, w, h = annotation["bbox"]
        assert row["image"] == files[annotation["image_id"]]
        assert corners(row) == pytest.approx([x, y, x + w, y + h], abs=0.011)
        assert row["label"] == names[annotation["category_id"]]
        assert float(row["score"]) == pytest.approx(annotation["score"], abs=1e-5)
        assert 0 < annotation["score"] <= 1
        width, height = sizes[Path(row["image"]).name]
        xmin, ymin, xmax, ymax = corners(row)
        assert 0 <= xmin < xmax <= width and 0 <= ymin < ymax <= height
    return coco, rows


def most_overlap(rows: list[dict]) -> float:
    """The largest intersection over the smaller box of two boxes of one label."""
    boxes = np.array([corners(r) for r in rows])
    labels = np.array([r["label"] for r in rows])
    low = np.maximum(boxes[:, None, :2], boxes[None, :, :2])
    high = np.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = np.prod(np.clip(high - low, 0, None), axis=2)
    area = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
    ios = inter / np.minimum(area[:, None], area[None, :])
    ios[(labels[:, None] != labels[None, :]) | np.eye(len(boxes), dtype=bool)] = 0
    return float(ios.max())


@pytest.fixture(scope="module")
def big_scene_out(detector: dict, big_scene: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("out-big")
    with pytest.MonkeyPatch.context() as patch:
        code, _ = run_cli(patch, predict_args(detector, out, big_scene))
    assert code == 0
    return out


def test_predict_writes_coco_and_csv_for_a_scene_of_many_slices(
    detector: dict, big_scene: Path, big_scene_out: Path
) -> None:
    coco, rows = check_outputs(big_scene_out, {"scene.png": (4000, 4000)})
    assert coco["images"][0]["file_name"] == str(big_scene)
    assert len(rows) > 1
    assert [c["name"] for c in coco["categories"]] == list(load_params(detector["params"]).classes)
    # Boxes come from slices all over the scene, in scene pixels.
    assert max(float(r["xmax"]) for r in rows) > 2000 and max(float(r["ymax"]) for r in rows) > 2000
    # The duplicates of overlapping slices are merged (nms, ios 0.5): no two boxes left that match.
    assert most_overlap(rows) < 0.5


def test_predicting_a_scene_twice_writes_the_same_bytes(
    detector: dict, big_scene: Path, big_scene_out: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    predict(monkeypatch, capsys, detector, tmp_path, big_scene)
    for name in ("predictions.json", "predictions.csv"):
        assert (tmp_path / name).read_bytes() == (big_scene_out / name).read_bytes()


def write_geotiff(path: Path, pixels: np.ndarray, crs: str | None) -> None:
    import rasterio
    from rasterio.transform import from_origin

    height, width = pixels.shape[:2]
    georef = {"crs": crs, "transform": from_origin(*ORIGIN, PIXEL, PIXEL)} if crs else {}
    with rasterio.open(
        path, "w", driver="GTiff", width=width, height=height, count=pixels.shape[2],
        dtype=pixels.dtype.name, tiled=True, blockxsize=256, blockysize=256, **georef,
    ) as dst:  # fmt: skip
        dst.write(np.moveaxis(pixels, -1, 0))


def test_geotiff_gives_geojson_in_its_crs_and_the_boxes_of_the_same_pixels(
    detector: dict, tmp_path: Path, monkeypatch, capsys
) -> None:
    width, height = 1250, 900  # not square, not a whole number of slices
    pixels = scene_pixels(detector["tiles"][5:], width, height)
    tif, png = tmp_path / "ortho.tif", tmp_path / "same.png"
    write_geotiff(tif, pixels, CRS)
    Image.fromarray(pixels).save(png)

    raster, pillow = RasterScene(tif), PillowScene(png, None)
    try:
        assert raster.size == pillow.size == (width, height)
        for window in tile_windows(width, height, 320, 64)[::3]:
            np.testing.assert_array_equal(raster.read(window), pillow.read(window))
    finally:
        raster.close()

    out = tmp_path / "out"
    predict(monkeypatch, capsys, detector, out, tif, png)
    _, rows = check_outputs(out, {"ortho.tif": (width, height), "same.png": (width, height)})
    from_tif = [{k: v for k, v in r.items() if k != "image"} for r in rows if r["image"] == str(tif)]
    from_png = [{k: v for k, v in r.items() if k != "image"} for r in rows if r["image"] == str(png)]
    assert from_tif, "no boxes on the GeoTIFF"
    assert from_tif == from_png

    assert sorted(p.name for p in out.glob("*.geojson")) == ["ortho.geojson"]
    collection = json.loads((out / "ortho.geojson").read_text())
    assert collection["type"] == "FeatureCollection"
    assert collection["crs"]["properties"]["name"] == CRS
    assert len(collection["features"]) == len(from_tif)
    for feature, row in zip(collection["features"], from_tif, strict=True):
        assert feature["geometry"]["type"] == "Polygon"
        xmin, ymin, xmax, ymax = corners(row)
        pixel_ring = [(xmin, ymin), (xmax, ymin), (xmax, ymax), (xmin, ymax), (xmin, ymin)]
        expected = [[ORIGIN[0] + x * PIXEL, ORIGIN[1] - y * PIXEL] for x, y in pixel_ring]
        (ring,) = feature["geometry"]["coordinates"]
        assert np.allclose(ring, expected, rtol=0, atol=0.0006)  # the CSV's 0.01 px rounding
        assert feature["properties"]["label"] == row["label"]
        assert feature["properties"]["score"] == pytest.approx(float(row["score"]), abs=1e-5)


def test_geotiff_without_crs_is_predicted_without_geojson_and_with_a_warning(
    detector: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from genfusion.commands.predict import main

    tif = tmp_path / "plain.tif"
    write_geotiff(tif, scene_pixels(detector["tiles"], 700, 500), crs=None)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="genfusion"):
        main(load_params(detector["params"]), weights=detector["weights"], images=[tmp_path], out=out)
    _, rows = check_outputs(out, {"plain.tif": (700, 500)})
    assert rows
    assert not list(out.glob("*.geojson"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(tif) in w and "CRS" in w for w in warnings), warnings


def params_with(detector: dict, tmp_path: Path, **predict: object) -> Path:
    values = yaml.safe_load(detector["params"].read_text())
    values["predict"].update(predict)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def refused(monkeypatch, capsys, detector: dict, out: Path, *images: Path, **options: Path) -> str:
    """`genfusion predict` that must stop with a clear error (exit 2, no traceback): its message."""
    code, err = run_cli(monkeypatch, predict_args(detector, out, *images, **options), capsys)
    assert code == 2, err
    assert "Traceback" not in err
    assert err.startswith("error: "), err
    assert not (out / "predictions.json").exists()
    return " ".join(err.split())  # the message, wherever the terminal wrapped it


def small_scene(detector: dict, tmp_path: Path) -> Path:
    path = tmp_path / "good.png"
    Image.fromarray(scene_pixels(detector["tiles"], 200, 150)).save(path)
    return path


def test_bad_images_are_refused_naming_them(detector: dict, tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "out"
    good = small_scene(detector, tmp_path)
    text = tmp_path / "x.png"
    text.write_text("not an image at all\n")
    # Nothing is written, not even the predictions of the good image before it.
    assert f"{text}: not a readable image" in refused(monkeypatch, capsys, detector, out, good, text)
    missing = tmp_path / "missing.png"
    assert f"{missing}: no such image or folder" in refused(monkeypatch, capsys, detector, out, missing)


def test_a_16_bit_colour_png_is_predicted_as_its_8_bit_pixels_and_said_so(
    detector: dict, tmp_path: Path, monkeypatch, capsys, caplog
) -> None:
    """Pillow reads a 16-bit colour PNG as 8-bit without saying so: predict says so, and the
    boxes are those of the 8-bit image it was read as."""
    plain = small_scene(detector, tmp_path)
    deep = tmp_path / "deep.png"
    deep.write_bytes(deep_png(np.asarray(Image.open(plain)).astype(np.uint16) * 257))
    outputs = {}
    for scene in (plain, deep):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="genfusion"):
            code, err = run_cli(monkeypatch, predict_args(detector, tmp_path / scene.stem, scene), capsys)
        assert code == 0, err
        outputs[scene.stem] = [
            row | {"image": ""} for row in read_csv(tmp_path / scene.stem / "predictions.csv")
        ]
        said = [record.getMessage() for record in caplog.records]
        assert (f"{deep}: converted to 8-bit RGB (16bit) before prediction" in said) == (scene == deep), said
    assert outputs["deep"] == outputs["good"]


def test_a_16_bit_geotiff_is_refused_with_advice_to_convert_it(
    detector: dict, tmp_path: Path, monkeypatch, capsys
) -> None:
    deep = tmp_path / "deep.tif"
    write_geotiff(deep, np.full((64, 80, 3), 40000, np.uint16), CRS)
    message = refused(monkeypatch, capsys, detector, tmp_path / "out", deep)
    assert str(deep) in message and "3 band(s) of uint16" in message and "convert it" in message


def png_header(path: Path, width: int, height: int) -> None:
    """A PNG that says it is `width` x `height` px (its pixels are never read)."""
    import io
    import struct
    import zlib

    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    header = struct.pack(">II", width, height) + data[24:29]  # IHDR: size, then depth, colour...
    data[16:33] = header + struct.pack(">I", zlib.crc32(b"IHDR" + header))
    path.write_bytes(bytes(data))


def test_a_png_over_max_pixels_is_refused_with_advice(
    detector: dict, tmp_path: Path, monkeypatch, capsys
) -> None:
    small = tmp_path / "small.png"
    png_header(small, 14000, 1000)
    with Image.open(small) as image:
        assert image.size == (14000, 1000)  # the header is read as written
    over_pillow = tmp_path / "over-pillow.png"
    png_header(over_pillow, 14000, 14000)  # 196 Mpx: over Pillow's own limit, not seeds.max_pixels
    message = refused(monkeypatch, capsys, detector, tmp_path / "out", over_pillow)
    assert f"{over_pillow}: corrupt or truncated image" in message  # decoded, so no pixels found
    huge = tmp_path / "ortho.png"
    png_header(huge, 30000, 20000)  # 600 Mpx: over the default seeds.max_pixels (500 million)
    message = refused(monkeypatch, capsys, detector, tmp_path / "out", huge)
    assert f"{huge}: 30000 x 20000 px (600 megapixels) is over seeds.max_pixels" in message
    assert "tiled GeoTIFF" in message


def test_a_slice_smaller_than_the_model_stride_is_refused(
    detector: dict, tmp_path: Path, monkeypatch, capsys
) -> None:
    scene = small_scene(detector, tmp_path)
    params = params_with(detector, tmp_path, slice=16, overlap=0)
    message = refused(monkeypatch, capsys, detector, tmp_path / "out", scene, params=params)
    assert "predict.slice (16 px)" in message and "stride" in message


def test_weights_that_are_no_detector_are_refused(
    detector: dict, tmp_path: Path, monkeypatch, capsys
) -> None:
    from genfusion.integrations.ultralytics import load_yolo

    scene = small_scene(detector, tmp_path)
    out = tmp_path / "out"
    noise = tmp_path / "w.pt"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    for weights, problem in ((noise, "UnpicklingError: invalid load key"), (empty, "EOFError")):
        code, err = run_cli(monkeypatch, predict_args(detector, out, scene, weights=weights), capsys)
        assert code == 2
        # One line: the file, what is wrong, and what to give instead (no advice to download).
        (line,) = err.strip().splitlines()
        assert line.startswith(f"error: {weights}: not a YOLO weights file ({problem}")
        assert "models/detectors/<variant>-<seed>/weights/best.pt" in line
        assert "yolo predict" not in line

    classifier = tmp_path / "classify.pt"
    load_yolo("yolov8n-cls.yaml").save(classifier)
    message = refused(monkeypatch, capsys, detector, out, scene, weights=classifier)
    assert f"{classifier}: a YOLO classify model, not a detector" in message

    missing = tmp_path / "gone.pt"
    assert f"{missing}: weights file not found" in refused(
        monkeypatch, capsys, detector, out, scene, weights=missing
    )


def test_errors_are_genfusion_errors_when_called_from_python(detector: dict, tmp_path: Path) -> None:
    from genfusion.commands.predict import main

    text = tmp_path / "x.tif"
    text.write_text("not a raster\n")
    with pytest.raises(GenfusionError, match="x.tif: not a readable image"):
        main(load_params(detector["params"]), weights=detector["weights"], images=[text], out=tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(GenfusionError, match="empty: no images"):
        main(load_params(detector["params"]), weights=detector["weights"], images=[empty], out=tmp_path)
