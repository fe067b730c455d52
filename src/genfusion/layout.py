"""The folder conventions every stage shares, written once.

A split dataset (`data/real`, `data/datasets/<variant>`) is Ultralytics' layout:
`images/<split>/<stem>.png`, `labels/<split>/<stem>.txt` (YOLO lines), `dataset.yaml`, and a
`manifest.csv`. A flat image set (`data/generated/<subject>`, `data/variations`,
`data/class_images/<subject>`, `data/prelabels/<subject>`, `data/annotations/<subject>`) has the
same folders without the split level. An image's labels have the image's stem.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from genfusion.errors import GenfusionError

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.csv"
DATASET_YAML = "dataset.yaml"
# The key of the real dataset's dataset.yaml (and of its test scenes' COCO `info`) naming the
# import it comes from.
GENERATION = "generation"
# A label mask (`masks/<stem>.png`) holds 0 for background, c+1 for class c, and this for
# "uncertain": pixels no box covers and no loss counts.
IGNORE = 255


def project_root() -> Path:
    """The folder holding dvc.yaml at or above the working directory (the working directory when
    there is none): where project-local tool folders such as `.yolo/` live, whichever subfolder a
    command runs from."""
    here = Path.cwd()
    return next((folder for folder in (here, *here.parents) if (folder / "dvc.yaml").is_file()), here)


def detector_weights(detectors: Path, name: str) -> Path:
    """The weights the train stage keeps of detector `name` (`<variant>-<seed>`)."""
    return Path(detectors) / name / "weights" / "best.pt"


def dataset_generation(real: Path) -> str | None:
    """The import the real dataset `real` comes from (None for one written before it was recorded)."""
    path = Path(real) / DATASET_YAML
    if not path.is_file():
        return None
    return (yaml.safe_load(path.read_text()) or {}).get(GENERATION)


def images_dir(root: Path, split: str | None = None) -> Path:
    return Path(root) / "images" / split if split else Path(root) / "images"


def labels_dir(root: Path, split: str | None = None) -> Path:
    return Path(root) / "labels" / split if split else Path(root) / "labels"


def image_files(root: Path, split: str | None = None) -> list[Path]:
    """The set's PNG images (every stage writes PNG), sorted by name."""
    return sorted(images_dir(root, split).glob("*.png"))


def label_file(root: Path, stem: str, split: str | None = None) -> Path:
    return labels_dir(root, split) / f"{stem}.txt"


@dataclass(frozen=True, kw_only=True)
class Sources:
    """The pipeline's data folders a stage reads, each given on its command line by dvc.yaml.
    A stage is given only the folders it declares (the `real` dataset stage, the real tiles
    alone): the others are None, and `folder` refuses to read one."""

    real: Path
    generated: Path | None = None  # the generate stages' images, a folder per subject
    prelabels: Path | None = None  # automatic labels, a folder per subject
    annotations: Path | None = None  # people's labels, a folder per subject
    detectors: Path | None = None  # the inspect stage's: trained detectors, whose predictions it shows
    filtered: Path | None = None  # the filter stage's choices, a folder per filtered set
    # The sets stages make from the real train tiles, by the variant that trains on each
    # (genfusion.variants): {"composite": data/composites, "inpaint": data/inpainted, ...}.
    sets: Mapping[str, Path] = field(default_factory=dict)

    def folder(self, name: str, reader: str) -> Path:
        """Folder `name` (a field), which `reader` (a stage, in errors) needs."""
        path = getattr(self, name)
        if path is None:
            raise GenfusionError(f"{reader}: needs the {name} folder; pass --{name}")
        return path

    def set_folder(self, variant: str, reader: str) -> Path:
        """The folder of the set variant `variant` trains on, which `reader` needs."""
        if variant not in self.sets:
            raise GenfusionError(f"{reader}: needs the {variant} set's folder; pass --set {variant}=FOLDER")
        return Path(self.sets[variant])


def generated_label(sources: Sources, subject: str, stem: str, label_source: str) -> Path | None:
    """The label file a detector trains on for generated image `stem`, as `labels.source` says:
    the prelabel stage's (auto), people's (manual), or people's where they exist (manual_else_auto);
    None when the chosen source has none."""
    auto = label_file(sources.folder("prelabels", "labels") / subject, stem)
    manual = label_file(sources.folder("annotations", "labels") / subject, stem)
    candidates = {"auto": [auto], "manual": [manual], "manual_else_auto": [manual, auto]}[label_source]
    return next((path for path in candidates if path.is_file()), None)
