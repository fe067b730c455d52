"""Inpaint benchmark: the `inpaint` stage's core against a bare diffusers inpainting loop.

Run from the project root after `dvc repro` (needs models/base and data/real):
    .venv/bin/python benchmarks/bench_inpaint.py [--images 8] [--batch 4] [--steps 4] [--rounds 3]
It inpaints `--images` images, one on each of the first real train tiles, with the default run's
generator (models/base) at diffusion.resolution, the `inpaint` params of params.yaml with `--batch`
and `--steps`:
- ours: `make_inpaintings` into a fresh folder (layouts drawn, masks, the pipeline built on the
  generator's components, paste inside the mask, labels, manifest, atomic PNG and label writes,
  resume checks, progress bar);
- bare: the same layouts, masks, batches and seeds through a bare
  `StableDiffusionInpaintPipeline(**pipe.components)` loop, pasted and labelled alike, the PNG and
  label files written with Pillow and `Path.write_text`, nothing else;
best of `--rounds` rounds each, images per second and the ratio ours / bare (>= 0.95 is the goal).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def bare(pipe, tiles, settings, names, task, prompt: str, resolution: int, out: Path) -> float:
    """Seconds to draw, inpaint, paste, label and write one image per tile with nothing around it."""
    import numpy as np
    import torch
    from diffusers import StableDiffusionInpaintPipeline
    from PIL import Image

    from genfusion.diffusion.pipelines import use_scheduler, working_size
    from genfusion.formats.yolo import label_text
    from genfusion.placement import box_statistics, cut_instances
    from genfusion.stages.inpaint import (
        draw_layout,
        grown_boxes,
        layout_labels,
        paste_inside,
        tile_mask,
        working_mask,
    )

    (out / "images").mkdir(parents=True)
    (out / "labels").mkdir()
    start = time.perf_counter()
    inpainter = StableDiffusionInpaintPipeline(**pipe.components, requires_safety_checker=False)
    inpainter.set_progress_bar_config(disable=True)
    use_scheduler(inpainter, settings.scheduler)
    instances, statistics = cut_instances(tiles, settings, task), box_statistics(tiles)
    work = [
        (
            tile,
            settings.seed + s,
            draw_layout(
                np.random.default_rng(settings.seed + s), tile, instances, statistics, settings, task
            ),
        )
        for s, tile in enumerate(tiles)
    ]
    blocks, current = [], []
    for item in work:  # consecutive images of one size, `batch` at a time, as run_jobs cuts them
        if current and (len(current) == settings.batch or current[-1][0].size != item[0].size):
            blocks.append(current)
            current = []
        current.append(item)
    blocks += [current] if current else []
    cell = pipe.vae_scale_factor
    for block in blocks:
        size = block[0][0].size
        size_work = working_size(size, resolution)
        grown = [grown_boxes(boxes, settings.mask_grow, size) for _, _, boxes in block]
        painted = inpainter(
            prompt=[prompt] * len(block),
            image=[Image.fromarray(tile.pixels).resize(size_work, Image.LANCZOS) for tile, _, _ in block],
            mask_image=[Image.fromarray(working_mask(g, size, size_work, cell)) for g in grown],
            width=size_work[0],
            height=size_work[1],
            strength=settings.strength,
            guidance_scale=settings.guidance,
            num_inference_steps=settings.steps,
            generator=[torch.Generator(pipe.device).manual_seed(seed) for _, seed, _ in block],
        ).images
        for (tile, _, boxes), g, image in zip(block, grown, painted, strict=True):
            back = np.asarray(image.convert("RGB").resize(size, Image.LANCZOS))
            Image.fromarray(paste_inside(tile.pixels, back, tile_mask(g, size))).save(
                out / "images" / f"{tile.stem}.png"
            )
            labels = layout_labels(tile, boxes, g, settings.max_occlusion)
            (out / "labels" / f"{tile.stem}.txt").write_text(label_text(labels, names, size, task))
    return time.perf_counter() - start


def ours(pipe, tiles, settings, names, task, prompt: str, resolution: int, out: Path) -> float:
    """Seconds of `make_inpaintings` for one image per tile into a fresh folder."""
    from genfusion.stages.inpaint import make_inpaintings

    start = time.perf_counter()
    make_inpaintings(
        pipe,
        tiles,
        names,
        settings,
        out,
        prompt=prompt,
        resolution=resolution,
        fingerprint="bench",
        task=task,
    )
    return time.perf_counter() - start


def inpaint_rates(
    images: int = 8, batch: int = 4, steps: int = 4, rounds: int = 3, threads: int | None = None
) -> dict[str, float]:
    """Images per second of ours and bare (best of `rounds`), and their ratio; prints a table."""
    import torch

    from genfusion.diffusion.pipelines import load_generator, render_prompt
    from genfusion.params import load_params
    from genfusion.stages.composite import load_tiles

    if threads:
        torch.set_num_threads(threads)
    params = load_params(ROOT / "params.yaml")
    diffusion, names, task = params.diffusion, params.classes, params.task
    settings = params.inpaint.model_copy(update={"per_image": 1, "batch": batch, "steps": steps})
    prompt = render_prompt(
        settings.prompt,
        "inpaint.prompt",
        subject="bench",
        class_prompt=diffusion.class_prompt,
        instance_prompt=diffusion.class_prompt,
    )
    pipe = load_generator(
        ROOT / "models/base", None, diffusion.dtype, diffusion.device, diffusion.attention_slicing
    )
    tiles = load_tiles(ROOT / "data/real", names)[:images]
    print(
        f"{len(tiles)} images ({max(tile.size[0] for tile in tiles)} px tiles) at {diffusion.resolution} px,"
        f" batch {batch}, {steps} steps x strength {settings.strength}, best of {rounds};"
        f" {diffusion.device}, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores"
    )
    times: dict[str, list[float]] = {"ours": [], "bare": []}
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as tmp:
            args = (pipe, tiles, settings, names, task, prompt, diffusion.resolution)
            times["bare"].append(bare(*args, Path(tmp) / "b"))
            times["ours"].append(ours(*args, Path(tmp) / "o"))
    rate = {name: len(tiles) / min(values) for name, values in times.items()}
    ratio = rate["ours"] / rate["bare"]
    print("| ours images/s | bare images/s | ours / bare |")
    print("|--------------:|--------------:|------------:|")
    print(f"| {rate['ours']:13.2f} | {rate['bare']:13.2f} | {ratio:11.2f} |")
    return {**rate, "ratio": ratio}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    inpaint_rates(args.images, args.batch, args.steps, args.rounds, args.threads)


if __name__ == "__main__":
    main()
