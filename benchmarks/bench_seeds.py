"""The seeds stage on large scenes, measured: tile planning, the whole import, and its memory.

    .venv/bin/python benchmarks/bench_seeds.py [--size 12000] [--boxes 31241] [--big 20000]

Needs nothing from the pipeline. In a temporary folder it writes a `--size` px square 8-bit RGB
GeoTIFF (tiled, deflate) with `--boxes` boxes of 10 to 60 px placed by a seeded draw, and times
1. tile planning (`plan_tiles`, at params' seeds.tile_size / tile_overlap, here 320 / 64: 2,209
   windows for 12,000 px) against the bare library doing the same work, shapely's STRtree (an
   R-tree of the boxes queried with every window, then the same clipping), and against the
   all-pairs check the stage made before (every box against every window), timed on a sample of
   windows and scaled to all of them;
2. the whole import (`run_seeds`: reading, planning, writing a PNG and a label file per tile)
   against the bare libraries doing the same reading and writing (rasterio reads each tile
   window, Pillow writes it);
3. the memory of `run_seeds` on a `--big` px square GeoTIFF (20,000 px: 400 megapixels, 1.1 GiB
   decoded), in a fresh process: its peak resident set (VmHWM, so GDAL's and numpy's allocations
   count) less its resident set before the import, against the size of the decoded scene.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

SEEDS = {"tile_size": 320, "tile_overlap": 64, "min_visibility": 0.5, "min_box_size": 2, "split_by": "tile"}


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak_rss() -> None:
    """Start the peak over (Linux 4.0+): a spawned process's peak would otherwise include its
    parent's resident set at the fork."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")


def peak_rss_mb() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024  # kB


def write_scene(path: Path, size: int) -> None:
    """A tiled GeoTIFF whose pixels vary with position (tiles differ, and compress like a scene
    with texture), written a band of rows at a time."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    profile = {
        "driver": "GTiff", "width": size, "height": size, "count": 3, "dtype": "uint8",
        "crs": "EPSG:32617", "transform": from_origin(404000.0, 3285000.0, 0.1, 0.1),
        "tiled": True, "blockxsize": 256, "blockysize": 256, "compress": "deflate",
    }  # fmt: skip
    rng = np.random.default_rng(0)
    texture = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    with rasterio.open(path, "w", **profile) as out:
        for y0 in range(0, size, 1024):
            rows = min(1024, size - y0)
            ys, xs = np.mgrid[y0 : y0 + rows, 0:size]
            band = texture[ys % 256, xs % 256] // 2 + ((xs // 97 + ys // 89) % 128)[..., None].astype(
                np.uint8
            )
            out.write(np.moveaxis(band, -1, 0), window=Window(0, y0, size, rows))


def random_boxes(size: int, count: int):
    from genfusion.boxes import Box

    rng = np.random.default_rng(1)
    corners = rng.uniform(0, size - 60, (count, 2))
    sides = rng.uniform(10, 60, (count, 2))
    return tuple(Box("Tree", *c, *(c + s)) for c, s in zip(corners, sides, strict=True))


def labelled(path: Path, size: int, boxes):
    from genfusion.boxes import LabelledImage

    return LabelledImage(path, boxes, (size, size), path.with_suffix(".json"))


def seeds_params():
    from genfusion.params import SeedsParams

    return SeedsParams(source=Path("unused"), class_map={"Tree": "tree"}, **SEEDS)


def best_of(repeats: int, work) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = work()
        times.append(time.perf_counter() - start)
    return min(times), result


def strtree_planning(boxes, windows, params):
    """The bare library: an R-tree of the boxes, queried with every window; the same clipping."""
    import shapely

    from genfusion.tiling import boxes_in_window

    tree = shapely.STRtree(shapely.box(*np.array([[b.x0, b.y0, b.x1, b.y1] for b in boxes]).T))
    frames = shapely.box(*np.array([[w.x0, w.y0, w.x1, w.y1] for w in windows]).T)
    window_index, box_index = tree.query(frames, predicate="intersects")
    order = np.lexsort((box_index, window_index))
    window_index, box_index = window_index[order], box_index[order]
    starts = np.searchsorted(window_index, np.arange(len(windows) + 1))
    return [
        boxes_in_window(
            [boxes[i] for i in box_index[starts[k] : starts[k + 1]]],
            window,
            params.min_visibility,
            params.min_box_size,
        )  # fmt: skip
        for k, window in enumerate(windows)
    ]


def bare_import(path: Path, windows, out: Path) -> None:
    """Reading each tile window with rasterio and writing it with Pillow: the import's own I/O."""
    import rasterio
    from PIL import Image
    from rasterio.windows import Window

    out.mkdir()
    with rasterio.Env(GDAL_CACHEMAX=64), rasterio.open(path) as source:
        for w in windows:
            pixels = np.moveaxis(source.read(window=Window(w.x0, w.y0, w.width, w.height)), 0, -1)
            Image.fromarray(pixels).save(out / f"x{w.x0}_y{w.y0}.png")


def import_in_fresh_process(path: str, size: int, boxes: int, out: str) -> dict:
    """In a spawned process: `run_seeds` on the scene, with the resident set before and at peak."""
    sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115  (no progress bars)
    import rasterio  # noqa: F401  (GDAL's libraries load once, and are no part of the import's memory)
    from rasterio.windows import Window  # noqa: F401

    from genfusion.stages.seeds import run_seeds

    item = labelled(Path(path), size, random_boxes(size, boxes))
    params = seeds_params()
    reset_peak_rss()
    before = rss_mb()
    start = time.perf_counter()
    report = run_seeds([item], params, ["tree"], Path(out))
    return {
        "seconds": time.perf_counter() - start,
        "before": before,
        "peak": peak_rss_mb(),
        "tiles": sum(report["tiles"].values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=12000, help="side of the scene planned and imported (px)")
    parser.add_argument("--boxes", type=int, default=31241, help="boxes in that scene")
    parser.add_argument("--big", type=int, default=20000, help="side of the scene of the memory run (px)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of planning (best kept)")
    parser.add_argument("--sample", type=int, default=40, help="windows timed for the all-pairs check")
    args = parser.parse_args()

    from collections import Counter

    from genfusion.stages.seeds import plan_tiles, run_seeds
    from genfusion.tiling import boxes_in_window, tile_windows

    params = seeds_params()
    boxes = random_boxes(args.size, args.boxes)
    with tempfile.TemporaryDirectory(prefix="bench-seeds-") as tmp:
        folder = Path(tmp)
        scene_path = folder / "scene.tif"
        start = time.perf_counter()
        write_scene(scene_path, args.size)
        print(f"{args.size} px scene written in {time.perf_counter() - start:.1f} s", flush=True)

        from genfusion.scenes import Scene

        scene = Scene("scene", scene_path, (args.size, args.size), boxes)
        windows = tile_windows(args.size, args.size, params.tile_size, params.tile_overlap)
        ours_s, tiles = best_of(args.repeats, lambda: plan_tiles([scene], params, Counter()))
        tree_s, cuts = best_of(args.repeats, lambda: strtree_planning(boxes, windows, params))
        assert [t.boxes for t in tiles] == [c.boxes for c in cuts], "STRtree planning differs"
        sample = windows[:: max(1, len(windows) // args.sample)]
        start = time.perf_counter()
        for window in sample:
            boxes_in_window(boxes, window, params.min_visibility, params.min_box_size)
        pairs_s = (time.perf_counter() - start) / len(sample) * len(windows)

        item = labelled(scene_path, args.size, boxes)
        start = time.perf_counter()
        report = run_seeds([item], params, ["tree"], folder / "real")
        import_s = time.perf_counter() - start
        start = time.perf_counter()
        bare_import(scene_path, windows, folder / "bare")
        bare_s = time.perf_counter() - start

        big_path = folder / "big.tif"
        start = time.perf_counter()
        write_scene(big_path, args.big)
        print(f"{args.big} px scene written in {time.perf_counter() - start:.1f} s", flush=True)
        big_boxes = args.boxes * args.big**2 // args.size**2
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            memory = pool.submit(
                import_in_fresh_process, str(big_path), args.big, big_boxes, str(folder / "big-real")
            ).result()

    print()
    print(f"tile planning, {args.size} px scene, {args.boxes} boxes, {len(windows)} windows")
    print(f"(best of {args.repeats}; the all-pairs check timed on {len(sample)} windows)")
    print("| planning | seconds | ratio to STRtree |")
    print("|---|--:|--:|")
    print(f"| seeds stage (`plan_tiles`) | {ours_s:.2f} | {ours_s / tree_s:.2f} |")
    print(f"| shapely STRtree (bare library) | {tree_s:.2f} | 1.00 |")
    print(f"| every box x every window (before) | {pairs_s:.0f} | {pairs_s / tree_s:.0f} |")
    print()
    print(f"whole import of that scene: {sum(report['tiles'].values())} tiles")
    print("| import | seconds | ratio |")
    print("|---|--:|--:|")
    print(f"| `run_seeds` (read, plan, write tiles and labels) | {import_s:.1f} | {import_s / bare_s:.2f} |")
    print(f"| rasterio read + Pillow write of the same windows | {bare_s:.1f} | 1.00 |")
    print()
    megapixels = args.big**2 / 1e6
    print(f"memory: `run_seeds` on a {args.big} px GeoTIFF ({megapixels:.0f} MP, {big_boxes} boxes)")
    print("| tiles | seconds | RSS before MB | peak RSS MB | growth MB | decoded scene MB |")
    print("|--:|--:|--:|--:|--:|--:|")
    growth, decoded = memory["peak"] - memory["before"], args.big**2 * 3 / 2**20
    row = [memory["tiles"], memory["seconds"], memory["before"], memory["peak"], growth, decoded]
    print("| " + " | ".join(f"{value:.0f}" for value in row) + " |")


if __name__ == "__main__":
    main()
