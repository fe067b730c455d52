"""The variant registry (genfusion.variants) against what is written out elsewhere: the tiny
pipeline's list, params validation, dvc.yaml's `--set` options, and the command line."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml
from tiny_pipeline import BUILT, TINY, VARIANTS

from genfusion import variants
from genfusion.errors import GenfusionError
from genfusion.params import DatasetsParams, FilterParams, Params

ROOT = Path(__file__).resolve().parents[1]


def test_the_tiny_pipeline_builds_every_variant_the_registry_builds_by_default() -> None:
    assert TINY["datasets"]["variants"] == BUILT == list(variants.BUILT)
    # It trains real and some of them (tests/tiny_pipeline.py says which, and why).
    assert VARIANTS[0] == variants.REAL and set(VARIANTS[1:]) < set(BUILT)
    assert (
        sorted(TINY["filter"]["sets"]) == sorted(FilterParams().sets) == sorted(variants.FILTERED_BY_DEFAULT)
    )


def test_params_take_the_registry_names_and_refuse_others() -> None:
    assert DatasetsParams().variants == list(variants.BUILT)
    assert DatasetsParams(variants=list(variants.SYNTHETIC)).variants == list(variants.SYNTHETIC)
    assert set(FilterParams(sets={name: "data/x" for name in variants.MADE}).sets) == set(variants.MADE)
    with pytest.raises(ValueError, match="variations-filtered"):
        DatasetsParams(variants=["cutout"])
    with pytest.raises(ValueError, match="composite"):
        FilterParams(sets={"mixed": "data/generated"})


def test_a_filtered_variant_needs_its_set_in_filter_sets() -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["datasets"]["variants"] = ["variations-filtered"]
    raw["train"] |= {"variants": ["real"], "init_from": []}
    with pytest.raises(ValueError, match=r"\['variations-filtered'\] need their sets in filter.sets"):
        Params.model_validate(raw)


def test_every_made_set_reaches_the_stages_that_read_sets() -> None:
    """dvc.yaml passes each made set to `datasets` and `inspect build` (and declares its folder): a
    registry entry without them would build a dataset that cannot find its images."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name in ("datasets", "inspect"):
        given = dict(re.findall(r"--set (\S+)=\$\{paths\.(\w+)\}", stages[name]["cmd"]))
        assert sorted(given) == sorted(variants.MADE), name
        for variant, path in given.items():
            assert path == variants.REGISTRY[variant].made.folder
            assert f"${{paths.{path}}}" in stages[name]["deps"]


def test_a_filtered_variant_trains_on_a_made_set_and_real_tiles() -> None:
    for name in variants.MADE:
        filtered = variants.REGISTRY[f"{name}{variants.FILTERED}"]
        assert (filtered.filtered_from, filtered.with_real, filtered.made) == (name, True, None)
    assert [v.name for v in variants.REGISTRY.values() if v.reads_subjects] == [
        "synthetic",
        "mixed",
        "inpaint",
    ]


def test_set_options_are_parsed_and_bad_ones_named() -> None:
    parsed = variants.parse_sets(["composite=data/composites", "inpaint=data/inpainted"], "inspect")
    assert parsed == {"composite": Path("data/composites"), "inpaint": Path("data/inpainted")}
    for options, message in (
        (["data/composites"], "inspect: --set 'data/composites' is not NAME=FOLDER"),
        (["mixed=data/generated"], "inspect: --set: 'mixed' makes no set from the real tiles"),
        (["cutout=data/cutouts"], "inspect: --set: unknown variant 'cutout'"),
        (["composite=a", "composite=b"], "inspect: --set composite is given twice"),
    ):
        with pytest.raises(GenfusionError, match=re.escape(message)):
            variants.parse_sets(options, "inspect")


def test_a_set_per_subject_has_a_folder_and_a_stage_per_subject() -> None:
    folders = variants.set_folders("inpaint", Path("data/inpainted"), ["canopy", "shrub"])
    assert folders == [
        (Path("data/inpainted/canopy"), "inpainted/canopy", "inpaint@canopy"),
        (Path("data/inpainted/shrub"), "inpainted/shrub", "inpaint@shrub"),
    ]
    assert variants.set_folders("composite", Path("c"), ["canopy"]) == [
        (Path("c"), "composites", "composite")
    ]
    assert variants.set_stage("inpaint", Path("data/inpainted/canopy")) == "inpaint@canopy"
    assert variants.set_stage("variations", Path("data/variations")) == "variations"


EXAMPLE = ROOT / "docs/examples/rotated-variant.patch"


def test_the_contributing_guides_example_variant_applies_to_todays_code() -> None:
    """docs/contributing.md walks through the patch that adds the `rotated` variant: it must apply
    to the code as it is (once a variant like it is added for real, retire the example), and the
    guide's `git diff --stat` must list the files it changes, four source files at most."""
    applied = subprocess.run(
        ["git", "apply", "--check", str(EXAMPLE)], cwd=ROOT, capture_output=True, text=True
    )
    assert applied.returncode == 0, applied.stderr
    stat = subprocess.run(
        ["git", "apply", "--numstat", str(EXAMPLE)], cwd=ROOT, capture_output=True, text=True, check=True
    )
    files = [line.split("\t")[2] for line in stat.stdout.splitlines()]
    guide = (ROOT / "docs/contributing.md").read_text()
    shown = re.findall(r"^ (\S+)\s+\|\s+\d+", guide, flags=re.MULTILINE)
    assert sorted(shown) == sorted(files)
    sources = [f for f in files if f.startswith("src/")]
    assert len(sources) <= 4, sources
    assert {"dvc.yaml", "params.yaml", "src/genfusion/variants.py"} <= set(files)
