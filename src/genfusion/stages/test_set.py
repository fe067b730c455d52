"""`test_set@name` stage: one of `evaluate.extra_sets` imported as a scene set.

Any labelled set in a format the seeds stage reads (found by its files, as `seeds.format: auto`
does), mapped to the project's classes by `seeds.class_map` and checked like the seeds; its
images are kept whole (never tiled), so every detector scores each object once.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from genfusion.formats import read_annotations
from genfusion.params import Params
from genfusion.scene_images import pillow_limit_lifted
from genfusion.scenes import check_scene, write_scene_set


def main(params: Params, *, name: str, source: Path, out: Path) -> None:
    counts: Counter = Counter()
    with pillow_limit_lifted():  # headers only; what is decoded whole is bounded by max_pixels
        items = read_annotations(source, "auto")
        seeds = params.seeds
        scenes = [check_scene(item, seeds.class_map, seeds.min_box_size, counts) for item in items]
    write_scene_set(out, scenes, params.classes, f"test_set@{name}", seeds.max_pixels)
