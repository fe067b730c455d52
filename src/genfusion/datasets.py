"""`datasets@variant` stage: the YOLO dataset each detector variant trains on.

Datasets reference images where they already are (relative paths), never copies, so
DVC stores each image once. Validation and test are always the real val and test splits.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from genfusion import fsio
from genfusion.errors import GenfusionError


def count_split(real: Path, split: str) -> tuple[int, int]:
    """(images, boxes) of one split of a dataset written by `seeds`."""
    images = sorted((real / "images" / split).glob("*.png"))
    boxes = sum(
        len((real / "labels" / split / f"{image.stem}.txt").read_text().splitlines()) for image in images
    )
    return len(images), boxes


def build_dataset(variant: str, real: Path, out: Path) -> dict:
    if variant != "real":
        raise GenfusionError(f"datasets: unknown variant {variant!r}; known: ['real']")
    real_yaml = yaml.safe_load((real / "dataset.yaml").read_text())
    to_real = Path(os.path.relpath(real, out))
    splits = {split: (to_real / "images" / split).as_posix() for split in ("train", "val", "test")}
    train_images, train_boxes = count_split(real, "train")
    counts = {
        "variant": variant,
        "real_images": train_images,
        "synthetic_images": 0,
        "train_images": train_images,
        "train_boxes": train_boxes,
    }
    body = yaml.safe_dump(splits | {"names": real_yaml["names"]}, sort_keys=False)
    with fsio.replace_dir(out) as tmp:
        (tmp / "dataset.yaml").write_text(
            f"# YOLO dataset for the {variant!r} variant, written by `genfusion datasets`;"
            " paths are relative to this file.\n" + body
        )
        fsio.write_json(tmp / "counts.json", counts)
    return counts
