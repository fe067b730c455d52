"""`datasets@variant` stage: the YOLO dataset each detector variant trains on.

Each variant's train split is made as the registry (genfusion.variants) says: the real train
split (`real`), plus a set a stage makes from its tiles (variations, composite, inpaint), the
share of such a set the `filter@<set>` stage keeps (`<set>-filtered`), or generated images
labelled as `labels.source` says (`synthetic` alone, `mixed` at `datasets.mixed_ratio`).

Training images are relative symbolic links, never copies, so DVC stores each image once.
Label files (a few bytes each) are copied beside the links: YOLO finds an image's labels by
its path (`.../images/train/x.png` -> `.../labels/train/x.txt`), and synthetic labels live
apart from their images. Validation and test are always the real val and test splits.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from genfusion import fsio, layout, variants
from genfusion.errors import GenfusionError
from genfusion.layout import Sources
from genfusion.params import Params


@dataclass(frozen=True)
class GeneratedChoice:
    """Which generated images the synthetic and mixed variants take: those of `subjects` with a
    label from `label_source` (labels.source), `mixed_ratio` per real image for mixed."""

    subjects: Sequence[str]
    label_source: str
    mixed_ratio: float


@dataclass(frozen=True)
class TrainImage:
    image: Path
    label: Path
    synthetic: bool


def real_train(real: Path) -> list[TrainImage]:
    return [
        TrainImage(image, layout.label_file(real, image.stem, "train"), synthetic=False)
        for image in layout.image_files(real, "train")
    ]


def synthetic_train(
    sources: Sources, subjects: Sequence[str], label_source: str
) -> tuple[list[TrainImage], list[Path]]:
    """(labelled generated images, generated images without a label of the chosen source).

    Images are interleaved across subjects by index (`a_00000, b_00000, a_00001, ...`), so any
    prefix of the list, as `mixed` takes, draws evenly on every subject.
    """
    generated = sources.folder("generated", "datasets")
    per_subject = []
    for subject in subjects:
        folder = layout.images_dir(generated / subject)
        if not folder.is_dir():
            raise GenfusionError(f"{folder}: no generated images; run `dvc repro generate@{subject}`")
        per_subject.append(sorted(folder.glob("*.png")))
    labelled, unlabelled = [], []
    for image in interleave(per_subject):
        subject = image.parent.parent.name
        label = layout.generated_label(sources, subject, image.stem, label_source)
        if label is None:
            unlabelled.append(image)
        else:
            labelled.append(TrainImage(image, label, synthetic=True))
    return labelled, unlabelled


def interleave(lists: Sequence[Sequence[Path]]) -> list[Path]:
    longest = max((len(items) for items in lists), default=0)
    return [items[i] for i in range(longest) for items in lists if i < len(items)]


def manifest_train(folder: Path, stage: str) -> list[TrainImage]:
    """The images listed in the manifest of `stage`'s folder (its current request, in file order)."""
    manifest = folder / layout.MANIFEST
    if not manifest.is_file():
        raise GenfusionError(f"{manifest}: missing; run `dvc repro {stage}`")
    with manifest.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return [
        TrainImage(folder / row["file"], folder / row["label"], synthetic=True)
        for row in sorted(rows, key=lambda row: row["file"])
    ]


def kept_train(choices: Path) -> list[TrainImage]:
    """The images the filter stage kept of a set (its manifest lists them, in rank order, with
    paths relative to the set folder its summary names)."""
    manifest, summary = choices / layout.MANIFEST, choices / "summary.json"
    if not manifest.is_file() or not summary.is_file():
        raise GenfusionError(f"{choices}: no filter choices; run `dvc repro filter@{choices.name}`")
    folder = Path(json.loads(summary.read_text())["set"])
    with manifest.open(newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["kept"] == "true"]
    return [
        TrainImage(folder / row["file"], folder / row["label"], synthetic=True)
        for row in sorted(rows, key=lambda row: row["file"])
    ]


def select_train(
    name: str, sources: Sources, generated: GeneratedChoice | None
) -> tuple[list[TrainImage], int]:
    """(the variant's train images, generated images left out for want of a label), as the
    registry (genfusion.variants) says the variant is made."""
    reader = f"datasets@{name}"
    v = variants.variant(name, "datasets")
    real = real_train(sources.real) if v.with_real else []
    if v.filtered_from is not None:
        return real + kept_train(sources.folder("filtered", reader) / v.filtered_from), 0
    if v.made is not None:
        each = subjects(generated, name) if v.made.per_subject else []
        folders = variants.set_folders(name, sources.set_folder(name, reader), each)
        return real + [item for folder, _, stage in folders for item in manifest_train(folder, stage)], 0
    if v.generated is None:
        return real, 0
    chosen = subjects(generated, name)
    label_source, ratio = generated.label_source, generated.mixed_ratio
    labelled, unlabelled = synthetic_train(sources, chosen, label_source)
    missing = (
        f"{len(unlabelled)} generated images have no label from labels.source={label_source!r};"
        " run the prelabel stage or pull people's labels"
    )
    if v.generated == "all":
        if not labelled:
            raise GenfusionError(f"{reader}: {missing}")
        return real + labelled, len(unlabelled)
    wanted = round(ratio * len(real))
    if wanted > len(labelled):
        raise GenfusionError(
            f"datasets.mixed_ratio: {ratio:g} x {len(real)} real images needs {wanted} labelled"
            f" synthetic images, and {len(labelled)} exist; "
            + (missing if unlabelled else "raise generate.n (or lower the ratio)")
        )
    return real + labelled[:wanted], len(unlabelled)


def subjects(generated: GeneratedChoice | None, name: str) -> Sequence[str]:
    if generated is None:
        raise ValueError(f"the {name} variant needs a GeneratedChoice")
    if not generated.subjects:
        raise GenfusionError(f"datasets@{name}: params.yaml defines no subjects to generate images of")
    return generated.subjects


def count_boxes(labels: Iterable[Path]) -> int:
    return sum(sum(1 for line in label.read_text().splitlines() if line.strip()) for label in labels)


def check_outlines(variant: str, items: Sequence[TrainImage]) -> None:
    """The segment task needs an outline per object: Ultralytics would silently drop every
    outline of a dataset that mixes them with box-only lines."""
    for item in items:
        for number, line in enumerate(item.label.read_text().splitlines(), 1):
            if len(line.split()) == 5:
                raise GenfusionError(
                    f"datasets@{variant}: {item.label}: line {number} is a box without an outline;"
                    " task: segment trains on outlines only (use prelabel.method: attention, or a"
                    " segmentation detector, for automatic labels; polygons in Label Studio)"
                )


def write_variant_dataset(
    variant: str, items: Sequence[TrainImage], real: Path, names: list[str], counts: dict, out: Path
) -> None:
    # Images keep their own names: tiles, generated images and variations are named apart.
    seen: dict[str, Path] = {}
    for item in items:
        name = item.image.name
        if name in seen:
            raise GenfusionError(f"datasets@{variant}: {item.image} and {seen[name]} share the name {name}")
        seen[name] = item.image
    with fsio.replace_dir(out) as tmp:
        images, labels = layout.images_dir(tmp, "train"), layout.labels_dir(tmp, "train")
        images.mkdir(parents=True)
        labels.mkdir(parents=True)
        for item in items:
            name = item.image.name
            # Relative to where the link will live once the scratch folder is renamed to `out`.
            target = os.path.relpath(item.image.resolve(), layout.images_dir(out, "train").resolve())
            os.symlink(target, images / name)
            shutil.copyfile(item.label, labels / f"{Path(name).stem}.txt")
        to_real = Path(os.path.relpath(real.resolve(), out.resolve()))
        splits = {
            "train": "images/train",
            "val": layout.images_dir(to_real, "val").as_posix(),
            "test": layout.images_dir(to_real, "test").as_posix(),
        }
        body = yaml.safe_dump(splits | {"names": names}, sort_keys=False)
        (tmp / layout.DATASET_YAML).write_text(
            f"# YOLO dataset for the {variant!r} variant, written by `genfusion datasets`;"
            " paths are relative to this file.\n" + body
        )
        fsio.write_json(tmp / "counts.json", counts)


def build_dataset(
    variant: str,
    sources: Sources,
    out: Path,
    generated: GeneratedChoice | None = None,
    task: str = "detect",
) -> dict:
    items, unlabelled = select_train(variant, sources, generated)
    if task == "segment":
        check_outlines(variant, items)
    names = yaml.safe_load((sources.real / layout.DATASET_YAML).read_text())["names"]
    counts = {
        "variant": variant,
        "real_images": sum(not item.synthetic for item in items),
        "synthetic_images": sum(item.synthetic for item in items),
        "train_images": len(items),
        "train_boxes": count_boxes(item.label for item in items),
        # The yardstick of `train.same_steps`: every variant trains on as many images as this.
        "real_train_split": len(real_train(sources.real)),
        "synthetic_without_label": unlabelled,
    }
    write_variant_dataset(variant, items, sources.real, names, counts, out)
    return counts


def main(params: Params, *, variant: str, sources: Sources, out: Path) -> dict:
    # A variant reads the params that choose generated images only if it takes them (or a set
    # per subject): the real detector (which labels the generated images) must not depend on them.
    generated = None
    if variants.variant(variant, "datasets").reads_subjects:
        generated = GeneratedChoice(list(params.subjects), params.labels.source, params.datasets.mixed_ratio)
    return build_dataset(variant, sources, out, generated, params.task)
