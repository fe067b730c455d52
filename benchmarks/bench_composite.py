"""Composite benchmark: the `composite` stage against a bare loop doing the same work.

Run from the project root after `dvc repro seeds` (needs data/real):
    .venv/bin/python benchmarks/bench_composite.py [--images 200] [--repeats 3]
It cuts the objects of the real train tiles once, then makes `--images` composites on them
(320 px tiles in the default run) with the `composite` params of params.yaml:
- ours: `make_composites` into a fresh folder (placements drawn, manifest, atomic PNG and label
  writes, resume checks, progress bar);
- bare: the same `plan` + `render_composite` calls and the same PNG and label files written
  with Pillow and `Path.write_text`, nothing else;
both with Gaussian and with Poisson blending, best of `--repeats` rounds, images per second and
the ratio ours / bare (>= 0.95 is the goal; >= 50 images/s with Gaussian blending on 2 cores).
Then the cost per pasted object at density 0.5, 1, 2 and 4, which stays flat when the cost
grows linearly with the objects (occlusion is settled in one pass over each object's box).
Last, the `inpaint` stage against a bare diffusers inpainting loop (`bench_inpaint.py`, whose
options `--inpaint-images` and `--inpaint-steps` are passed on; 0 images skips it).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def bare(tiles, instances, statistics, settings, names, task, count: int, out: Path) -> float:
    """Seconds to draw, render and write `count` composites with nothing around them."""
    import numpy as np
    from PIL import Image

    from genfusion.formats.yolo import label_text
    from genfusion.placement import plan
    from genfusion.stages.composite import render_composite

    (out / "images").mkdir(parents=True)
    (out / "labels").mkdir()
    start = time.perf_counter()
    for k in range(count):
        tile = tiles[k % len(tiles)]
        placements = plan(
            np.random.default_rng(k), tile, instances, statistics, settings,
            flip=settings.flip, colour_jitter=settings.colour_jitter,
        )  # fmt: skip
        pixels, labels = render_composite(tile, instances, placements, settings)
        Image.fromarray(pixels).save(out / "images" / f"{k}.png")
        (out / "labels" / f"{k}.txt").write_text(label_text(labels, names, tile.size, task))
    return time.perf_counter() - start


def ours(tiles, settings, names, task, count: int, out: Path) -> float:
    """Seconds of `make_composites` for `count` composites (per_image set to reach it)."""
    from genfusion.stages.composite import make_composites

    per_image = -(-count // len(tiles))
    start = time.perf_counter()
    rows = make_composites(tiles, names, settings.model_copy(update={"per_image": per_image}), out, task=task)
    return (time.perf_counter() - start) * count / len(rows)


def main() -> None:
    import torch

    from genfusion.params import load_params
    from genfusion.placement import box_statistics, cut_instances, load_tiles, plan
    from genfusion.stages.composite import render_composite

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--inpaint-images", type=int, default=8)
    parser.add_argument("--inpaint-steps", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)  # nothing here uses torch; accelerate's state imports it

    params = load_params(ROOT / "params.yaml")
    names, task = params.classes, params.task
    tiles = load_tiles(ROOT / "data/real", names)
    instances = cut_instances(tiles, params.composite, task)
    statistics = box_statistics(tiles)
    side = max(max(tile.size) for tile in tiles)
    print(
        f"{len(tiles)} real train tiles of at most {side} px, {len(instances)} cut-outs;"
        f" {args.images} composites per run, best of {args.repeats}; {os.cpu_count()} cores"
    )
    print("| blend    | ours images/s | bare images/s | ours / bare |")
    print("|----------|--------------:|--------------:|------------:|")
    for blend in ("gaussian", "poisson"):
        settings = params.composite.model_copy(update={"blend": blend})
        times = {"ours": [], "bare": []}
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                times["bare"].append(
                    bare(tiles, instances, statistics, settings, names, task, args.images, Path(tmp) / "b")
                )
                times["ours"].append(ours(tiles, settings, names, task, args.images, Path(tmp) / "o"))
        rate = {name: args.images / min(values) for name, values in times.items()}
        ratio = rate["ours"] / rate["bare"]
        print(f"| {blend:8} | {rate['ours']:13.1f} | {rate['bare']:13.1f} | {ratio:11.2f} |")

    import numpy as np

    print("\ncost per pasted object (render only, Gaussian blending, 100 composites each)")
    print("| density | objects per composite | ms per composite | ms per object |")
    print("|--------:|----------------------:|-----------------:|--------------:|")
    for density in (0.5, 1.0, 2.0, 4.0):
        settings = params.composite.model_copy(update={"density": density})
        plans = [
            plan(
                np.random.default_rng(k),
                tiles[k % len(tiles)],
                instances,
                statistics,
                settings,
                flip=settings.flip,
                colour_jitter=settings.colour_jitter,
            )  # fmt: skip
            for k in range(100)
        ]
        start = time.perf_counter()
        for k, placements in enumerate(plans):
            render_composite(tiles[k % len(tiles)], instances, placements, settings)
        seconds = time.perf_counter() - start
        objects = sum(len(p) for p in plans)
        print(
            f"| {density:7.1f} | {objects / len(plans):21.1f} | {seconds * 1000 / len(plans):16.2f}"
            f" | {seconds * 1000 / objects:13.3f} |"
        )

    if args.inpaint_images:
        from bench_inpaint import inpaint_rates  # beside this file

        print("\ninpaint: the stage against a bare diffusers inpainting loop")
        inpaint_rates(images=args.inpaint_images, steps=args.inpaint_steps, rounds=args.repeats)


if __name__ == "__main__":
    main()
