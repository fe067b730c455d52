"""Sliced prediction, measured: `genfusion predict` against SAHI on one large scene, and its memory.

Run from the project root after `dvc repro train@real-0` (needs data/real and the real detector):
    .venv/bin/python benchmarks/bench_predict.py [--size 4000] [--repeats 3] [--sizes 2000 4000 8000]
Builds a `--size` px square scene, a deterministic mosaic of the real tiles (data/real/images),
and saves it in a temporary folder as a PNG and as a tiled GeoTIFF (EPSG:32617, 256 px blocks,
3 uint8 bands). With the same detector, slice, overlap, conf, batch and merge (params `predict`)
it times
- `predict_scene` (the core of `genfusion predict`, the scene opened with `open_scene`) on the
  PNG and on the GeoTIFF;
- SAHI's `get_sliced_prediction` on the PNG (overlap ratio = overlap / slice, NMS with the same
  match metric and threshold, its low-confidence switch turned off);
and prints for each the wall time (best of `--repeats`, reading the file included), megapixels
per second, peak memory and the boxes found, with the ratio of megapixels per second ours / SAHI.
Then it runs `predict_scene` once on the GeoTIFF and the PNG of each of `--sizes`: the GeoTIFF is
read window by window (GDAL's block cache capped by `genfusion.scene_images.GDAL_CACHE_MB`), the
PNG is decoded whole.

Memory is the resident set (RSS, so torch's, numpy's and GDAL's allocations all count): each run
is a fresh spawned process, and "growth" is its peak RSS (`ru_maxrss`) less its RSS just before
the timed runs (model loaded, one batch predicted to warm up).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

WEIGHTS = Path("models/detectors/real-0/weights/best.pt")
TILES = Path("data/real/images")
# Our merge methods under SAHI's names (ours are greedy, as SAHI's GREEDYNMM; SAHI has no WBF).
SAHI_MERGE = {"nms": "NMS", "nmm": "GREEDYNMM"}


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def quiet() -> None:
    """No progress bars from the child processes (they still run, as in `genfusion predict`)."""
    sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115


def mosaic(tiles: list[np.ndarray], size: int) -> np.ndarray:
    """A size x size RGB scene of the tiles, each placed by a seeded draw and turned a random
    quarter-turn (so that neighbouring cells differ); the same for a given tile list and size."""
    side = tiles[0].shape[0]
    cells = -(-size // side)
    rng = np.random.default_rng(0)
    picks = rng.integers(0, len(tiles), (cells, cells))
    turns = rng.integers(0, 4, (cells, cells))
    scene = np.empty((cells * side, cells * side, 3), dtype=np.uint8)
    for row in range(cells):
        for col in range(cells):
            tile = np.rot90(tiles[picks[row, col]], turns[row, col])
            scene[row * side : (row + 1) * side, col * side : (col + 1) * side] = tile
    return np.ascontiguousarray(scene[:size, :size])


def write_scene(pixels: np.ndarray, folder: Path, compress: str) -> tuple[Path, Path]:
    import rasterio
    from PIL import Image
    from rasterio.transform import from_origin

    size = pixels.shape[0]
    png = folder / f"scene_{size}.png"
    Image.fromarray(pixels).save(png)
    tif = folder / f"scene_{size}.tif"
    profile = {
        "driver": "GTiff",
        "width": size,
        "height": size,
        "count": 3,
        "dtype": "uint8",
        "crs": "EPSG:32617",
        # 10 cm pixels, north-up, somewhere in UTM zone 17N.
        "transform": from_origin(404000.0, 3285000.0, 0.1, 0.1),
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "photometric": "RGB",
    }
    if compress != "none":
        profile["compress"] = compress
    with rasterio.open(tif, "w", **profile) as out:
        out.write(np.moveaxis(pixels, -1, 0))
    return png, tif


# One predictor per worker process, set up by its first call and kept for the next ones.
_loaded: dict = {}


def setup_genfusion(params_path: str, weights: str, threads: int):
    import rasterio  # noqa: F401  (imported once per process by the first GeoTIFF; not timed here)
    import torch

    quiet()
    torch.set_num_threads(threads)
    from genfusion.integrations.ultralytics import load_yolo
    from genfusion.params import load_params
    from genfusion.prediction import check_slicing, predict_scene
    from genfusion.scene_images import open_scene

    params = load_params(Path(params_path))
    settings = params.predict
    model = load_yolo(Path(weights))
    check_slicing(model, Path(weights), settings)
    options = {
        "conf": settings.conf,
        "iou": settings.iou,
        "imgsz": params.train.imgsz,
        "device": params.train.device,
    }
    model.predict([np.zeros((settings.slice, settings.slice, 3), dtype=np.uint8)] * settings.batch,
                  verbose=False, **options)  # fmt: skip

    def run(path: str) -> np.ndarray:
        scene = open_scene(Path(path), None)
        try:
            return predict_scene(model, scene, settings, **options).boxes
        finally:
            scene.close()

    return run


def setup_sahi(params_path: str, weights: str, threads: int):
    import torch

    quiet()
    torch.set_num_threads(threads)
    from genfusion.integrations.ultralytics import configure_offline
    from genfusion.params import load_params

    configure_offline()  # before SAHI imports Ultralytics
    from sahi import AutoDetectionModel
    from sahi.predict import get_sliced_prediction

    params = load_params(Path(params_path))
    settings = params.predict
    if settings.merge not in SAHI_MERGE:
        raise SystemExit(f"predict.merge {settings.merge}: SAHI has no such merge; compare nms or nmm")
    model = AutoDetectionModel.from_pretrained(
        model_type="ultralytics",
        model_path=weights,
        confidence_threshold=settings.conf,
        device=params.train.device,
        image_size=params.train.imgsz,
    )
    model.perform_batch_inference(
        [np.zeros((settings.slice, settings.slice, 3), dtype=np.uint8)] * settings.batch
    )
    ratio = settings.overlap / settings.slice

    def run(path: str) -> np.ndarray:
        result = get_sliced_prediction(
            path,
            model,
            slice_height=settings.slice,
            slice_width=settings.slice,
            overlap_height_ratio=ratio,
            overlap_width_ratio=ratio,
            perform_standard_pred=False,
            postprocess_type=SAHI_MERGE[settings.merge],
            postprocess_match_metric=settings.match_metric.upper(),
            postprocess_match_threshold=settings.match_threshold,
            batch_size=settings.batch,
            force_postprocess_type=True,  # no switch to NMS/IOU at a low conf
            verbose=0,
        )
        found = result.object_prediction_list
        return np.array([p.bbox.to_xyxy() for p in found], dtype=float).reshape(-1, 4)

    return run


def predict_once(kind: str, path: str, params_path: str, weights: str, threads: int) -> dict:
    """In a worker process: one timed prediction of the scene at `path` (reading the file
    included), with the process's RSS before its first timed run and its peak RSS so far."""
    if kind not in _loaded:
        setup = setup_genfusion if kind == "genfusion" else setup_sahi
        run = setup(params_path, weights, threads)
        _loaded[kind] = (run, rss_mb())
    run, before = _loaded[kind]
    start = time.perf_counter()
    boxes = run(path)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "before": before, "peak": peak_rss_mb(), "boxes": boxes}


def worker() -> ProcessPoolExecutor:
    """A process of its own (spawned: a fresh interpreter), kept for the calls made to it."""
    return ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn"))


def matched(ours: np.ndarray, theirs: np.ndarray, threshold: float) -> int:
    """Boxes of `ours` with a box of `theirs` at IoU >= threshold (one to one, greedy)."""
    if len(ours) == 0 or len(theirs) == 0:
        return 0
    x0 = np.maximum(ours[:, None, 0], theirs[None, :, 0])
    y0 = np.maximum(ours[:, None, 1], theirs[None, :, 1])
    x1 = np.minimum(ours[:, None, 2], theirs[None, :, 2])
    y1 = np.minimum(ours[:, None, 3], theirs[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = (ours[:, 2] - ours[:, 0]) * (ours[:, 3] - ours[:, 1])
    area_b = (theirs[:, 2] - theirs[:, 0]) * (theirs[:, 3] - theirs[:, 1])
    iou = inter / (area_a[:, None] + area_b[None, :] - inter)
    free = np.ones(len(theirs), dtype=bool)
    count = 0
    for row in iou:
        row = np.where(free, row, 0)
        best = int(np.argmax(row))
        if row[best] >= threshold:
            free[best] = False
            count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=4000, help="side of the compared scene (px)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each variant (best kept)")
    parser.add_argument(
        "--sizes", type=int, nargs="*", default=[2000, 4000, 8000], help="scene sides of the memory runs"
    )
    parser.add_argument("--compress", default="deflate", help="GeoTIFF compression (none, deflate, lzw)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--weights", type=Path, default=WEIGHTS)
    args = parser.parse_args()
    from PIL import Image

    from genfusion.params import load_params
    from genfusion.tiling import tile_windows

    if not args.weights.is_file():
        raise SystemExit(f"{args.weights}: not found: run `dvc repro train@real-0` first")
    paths = sorted(TILES.glob("*/*.png"))
    if not paths:
        raise SystemExit(f"{TILES} holds no tiles: run `dvc repro seeds` first")
    tiles = []
    for path in paths:
        with Image.open(path) as tile:
            tiles.append(np.asarray(tile.convert("RGB")))
    side = min(min(t.shape[:2]) for t in tiles)
    tiles = [t[:side, :side] for t in tiles]
    params = load_params(args.params)
    settings = params.predict
    common = (str(args.params), str(args.weights), args.threads)

    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        folder = Path(tmp)
        scenes = {}
        for size in sorted({args.size, *args.sizes}):
            start = time.perf_counter()
            scenes[size] = write_scene(mosaic(tiles, size), folder, args.compress)
            print(f"scene {size} px written in {time.perf_counter() - start:.1f} s", flush=True)

        png, tif = scenes[args.size]
        variants = {
            "genfusion predict, PNG": ("genfusion", png),
            "genfusion predict, GeoTIFF": ("genfusion", tif),
            "SAHI get_sliced_prediction, PNG": ("sahi", png),
        }
        # One process per variant, the variants taking turns round by round, so that other work
        # on the machine slows them alike.
        workers = {name: worker() for name in variants}
        runs = {name: [] for name in variants}
        for round_ in range(args.repeats):
            for name, (kind, path) in variants.items():
                runs[name].append(workers[name].submit(predict_once, kind, str(path), *common).result())
                print(f"round {round_ + 1}, {name}: {runs[name][-1]['seconds']:.2f} s", flush=True)
        for pool in workers.values():
            pool.shutdown()

        memory = {}
        for size in args.sizes:
            for kind, path in (("GeoTIFF", scenes[size][1]), ("PNG", scenes[size][0])):
                with worker() as pool:
                    memory[size, kind] = pool.submit(predict_once, "genfusion", str(path), *common).result()
                print(f"memory run, {kind} {size} px: {memory[size, kind]['seconds']:.2f} s", flush=True)

    megapixels = args.size**2 / 1e6
    slices = len(tile_windows(args.size, args.size, settings.slice, settings.overlap))
    print()
    print(
        f"scene {args.size} x {args.size} px ({megapixels:.1f} MP), mosaic of {len(tiles)} real tiles;"
        f" {slices} slices of {settings.slice} px, overlap {settings.overlap} (SAHI ratio"
        f" {settings.overlap / settings.slice:.3g}), batch {settings.batch}, conf {settings.conf},"
        f" imgsz {params.train.imgsz}, merge {settings.merge}/{settings.match_metric}"
        f" {settings.match_threshold}; {args.threads} torch threads; GeoTIFF {args.compress};"
        f" best of {args.repeats} runs"
    )
    print(f"| {'variant':<33} | seconds | MP/s | peak RSS MB | growth MB | boxes |")
    print(f"|{'-' * 35}|--------:|-----:|------------:|----------:|------:|")
    rates = {}
    for name, results in runs.items():
        seconds = min(r["seconds"] for r in results)
        rates[name] = megapixels / seconds
        peak, before = results[-1]["peak"], results[-1]["before"]
        print(
            f"| {name:<33} | {seconds:7.2f} | {rates[name]:4.2f} | {peak:11.0f} | {peak - before:9.0f} |"
            f" {len(results[-1]['boxes']):5d} |"
        )
    sahi_name = "SAHI get_sliced_prediction, PNG"
    for name in ("genfusion predict, PNG", "genfusion predict, GeoTIFF"):
        paired = [s["seconds"] / o["seconds"] for o, s in zip(runs[name], runs[sahi_name], strict=True)]
        print(
            f"ratio {name} / SAHI, MP/s: {rates[name]:.2f} / {rates[sahi_name]:.2f} ="
            f" {rates[name] / rates[sahi_name]:.2f} (round by round: {', '.join(f'{r:.2f}' for r in paired)})"
        )
    ours, theirs = runs["genfusion predict, PNG"][-1]["boxes"], runs[sahi_name][-1]["boxes"]
    print(
        f"boxes: genfusion PNG {len(ours)}, GeoTIFF {len(runs['genfusion predict, GeoTIFF'][-1]['boxes'])},"
        f" SAHI {len(theirs)}; genfusion PNG boxes matched one to one by a SAHI box at IoU >= 0.99:"
        f" {matched(ours, theirs, 0.99)}, at IoU >= 0.5: {matched(ours, theirs, 0.5)}"
    )
    if not args.sizes:
        return
    print()
    print("memory by scene size (genfusion predict, one run each in a fresh process; growth = peak RSS")
    print("less the RSS before the run)")
    print("| side px |    MP | GeoTIFF s | GeoTIFF growth MB | PNG s | PNG growth MB | decoded scene MB |")
    print("|--------:|------:|----------:|------------------:|------:|--------------:|-----------------:|")
    for size in args.sizes:
        cells = []
        for kind in ("GeoTIFF", "PNG"):
            run = memory[size, kind]
            cells += [f"{run['seconds']:.2f}", f"{run['peak'] - run['before']:.0f}"]
        widths = (9, 17, 5, 13)
        row = " | ".join(cell.rjust(width) for cell, width in zip(cells, widths, strict=True))
        print(f"| {size:7d} | {size**2 / 1e6:5.1f} | {row} | {size**2 * 3 / 2**20:16.0f} |")


if __name__ == "__main__":
    main()
