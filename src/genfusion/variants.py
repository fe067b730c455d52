"""The dataset variants, the rows of the report: what each one trains on, written once.

A variant's train split is the real train split (or not), plus either the images of a set that
a stage makes from the real train tiles (labels known by construction), or generated images
labelled as `labels.source` says. Every set a stage makes can be ranked by the quality filter,
and `<variant>-filtered` then trains on the share it keeps.

Everything that depends on the kind of a variant reads this table: the names params.yaml may use
(`datasets.variants`, `train.variants`, the keys of `filter.sets`), the datasets stage, the sets
the inspect stage shows in FiftyOne and how it tags them, the stage the filter names when a set
is missing, and the `--set` options of `datasets` and `inspect build`. docs/contributing.md walks
through adding a variant.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from genfusion.errors import GenfusionError


@dataclass(frozen=True)
class MadeSet:
    """Images a stage makes from the real train tiles, with their labels, listed in the stage's
    manifest (`file`, `label`, and a column naming the tile each image was made from)."""

    stage: str  # the dvc.yaml stage that writes it (`<stage>@<subject>` for a set per subject)
    folder: str  # its folder's name under data/ (dvc.yaml's paths), and its set name in FiftyOne
    per_subject: bool  # a folder per subject, each made by the subject's generator
    tag: str  # the `source` field of its samples in FiftyOne
    origin: str  # the manifest column naming the real tile each image was made from

    def stage_for(self, subject: str | None) -> str:
        return f"{self.stage}@{subject}" if self.per_subject else self.stage


@dataclass(frozen=True)
class Variant:
    name: str
    # Trains on the real train split too.
    with_real: bool = True
    # The set of made images it adds (None: none).
    made: MadeSet | None = None
    # Adds generated images labelled as labels.source says: all of them, or datasets.mixed_ratio
    # per real train image (None: none). Only these variants read labels and datasets.mixed_ratio.
    generated: Literal["all", "mixed_ratio"] | None = None
    # For `<name>-filtered`: the variant whose set the filter ranked.
    filtered_from: str | None = None
    # Built by default (params.yaml's datasets.variants, the tiny pipeline's variants).
    default: bool = True

    @property
    def reads_subjects(self) -> bool:
        """Its images come from every subject's folder: it reads the `subjects` param."""
        return self.generated is not None or (self.made is not None and self.made.per_subject)


REAL = "real"
FILTERED = "-filtered"

_MADE = (
    Variant(
        "variations",
        made=MadeSet("variations", "variations", per_subject=False, tag="variation", origin="source_image"),
    ),
    Variant(
        "composite",
        made=MadeSet("composite", "composites", per_subject=False, tag="composite", origin="background"),
    ),
    Variant(
        "inpaint",
        made=MadeSet("inpaint", "inpainted", per_subject=True, tag="inpaint", origin="background"),
    ),
)
# The sets filter.sets names by default: their `-filtered` variants are built by default.
FILTERED_BY_DEFAULT = ("composite", "inpaint")
_FILTERED = tuple(
    Variant(f"{v.name}{FILTERED}", filtered_from=v.name, default=v.name in FILTERED_BY_DEFAULT) for v in _MADE
)
REGISTRY: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant(REAL),
        Variant("synthetic", with_real=False, generated="all"),
        Variant("mixed", generated="mixed_ratio"),
        *_MADE,
        *_FILTERED,
    )
}

# The names params.yaml may give.
SYNTHETIC = tuple(name for name in REGISTRY if name != REAL)
# The default run's datasets.variants.
BUILT = tuple(name for name in SYNTHETIC if REGISTRY[name].default)
# The variants whose set a stage makes from the real train tiles: the keys of filter.sets and of
# the `--set` options.
MADE = tuple(name for name, v in REGISTRY.items() if v.made is not None)
# FiftyOne's source tags of the made sets' samples.
MADE_TAGS = frozenset(REGISTRY[name].made.tag for name in MADE)


def variant(name: str, reader: str) -> Variant:
    """The variant `name`, which `reader` (a stage or param, in errors) names."""
    if name not in REGISTRY:
        raise GenfusionError(f"{reader}: unknown variant {name!r}; known: {list(REGISTRY)}")
    return REGISTRY[name]


def made_set(name: str, reader: str) -> MadeSet:
    """The set that variant `name`'s stage makes (`name` a key of filter.sets or `--set`)."""
    made = variant(name, reader).made
    if made is None:
        raise GenfusionError(f"{reader}: {name!r} makes no set from the real tiles; sets: {list(MADE)}")
    return made


def set_stage(name: str, folder: Path) -> str:
    """The stage that writes `folder`, a folder of variant `name`'s set (a value of filter.sets)."""
    made = made_set(name, "filter.sets")
    return made.stage_for(Path(folder).name if made.per_subject else None)


def set_folders(name: str, folder: Path, subjects: list[str]) -> list[tuple[Path, str, str]]:
    """(folder, set name in FiftyOne, stage that writes it) of each folder of variant `name`'s
    set under `folder`: one, or one per subject."""
    made = made_set(name, "sets")
    if not made.per_subject:
        return [(Path(folder), made.folder, made.stage_for(None))]
    return [(Path(folder) / s, f"{made.folder}/{s}", made.stage_for(s)) for s in subjects]


def parse_sets(options: list[str], reader: str) -> dict[str, Path]:
    """`--set NAME=FOLDER` options as {variant name: folder}, each name a variant that makes a set."""
    sets: dict[str, Path] = {}
    for option in options:
        name, equals, folder = option.partition("=")
        if not equals or not folder:
            raise GenfusionError(f"{reader}: --set {option!r} is not NAME=FOLDER (composite=data/composites)")
        made_set(name, f"{reader}: --set")
        if name in sets:
            raise GenfusionError(f"{reader}: --set {name} is given twice")
        sets[name] = Path(folder)
    return sets
