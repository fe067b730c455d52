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
from genfusion.scenes import check_scene, write_scene_set


def main(params: Params, *, name: str, source: Path, out: Path) -> None:
    items = read_annotations(source, "auto")
    counts: Counter = Counter()
    scenes = [check_scene(item, params.seeds.class_map, params.seeds.min_box_size, counts) for item in items]
    write_scene_set(out, scenes, params.classes, f"test_set@{name}")
