from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from genfusion.errors import GenfusionError
from genfusion.params import load_params, parse_params, profile_overrides, profile_trials

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def raw() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_project_params_load_with_their_defaults() -> None:
    params = load_params(ROOT / "params.yaml")
    assert params.classes == ["tree"]
    assert set(params.seeds.class_map) == {"Tree", "Alive", "Dead"}
    assert params.train.model == "yolov8n.yaml"


def test_unknown_key_suggests_the_close_match(raw: dict) -> None:
    raw["seeds"]["tile_sise"] = raw["seeds"].pop("tile_size")
    with pytest.raises(GenfusionError, match=r"seeds\.tile_sise: unknown key; did you mean 'tile_size'\?"):
        parse_params(raw)


def test_unknown_section_suggests_the_close_match(raw: dict) -> None:
    raw["evalute"] = raw.pop("evaluate")
    with pytest.raises(GenfusionError, match=r"evalute: unknown key; did you mean 'evaluate'\?"):
        parse_params(raw)


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("train", "epochs", 0, r"train\.epochs: Input should be greater than or equal to 1"),
        ("train", "imgsz", 100, r"train\.imgsz: must be a multiple of 32"),
        ("seeds", "split_by", "site", r"seeds\.split_by: Input should be 'scene' or 'tile'"),
        ("seeds", "format", "xml", r"seeds\.format: Input should be 'auto', 'voc'"),
        ("train", "seeds", [0, 0], r"train\.seeds: has duplicates"),
        ("seeds", "min_visibility", 1.5, r"seeds\.min_visibility: Input should be less than or equal to 1"),
    ],
)
def test_bad_value_names_the_key_and_what_is_allowed(raw, section, key, value, message) -> None:
    raw[section][key] = value
    with pytest.raises(GenfusionError, match=message):
        parse_params(raw)


def test_split_fractions_must_sum_to_one(raw: dict) -> None:
    raw["seeds"]["split"] = {"train": 0.8, "val": 0.15, "test": 0.15}
    with pytest.raises(GenfusionError, match=r"split fractions must sum to 1, they sum to 1\.1"):
        parse_params(raw)


def test_overlap_must_be_smaller_than_the_tile(raw: dict) -> None:
    raw["seeds"]["tile_overlap"] = raw["seeds"]["tile_size"]
    with pytest.raises(GenfusionError, match=r"tile_overlap \(320\) must be smaller than tile_size"):
        parse_params(raw)


def test_class_map_must_target_project_classes(raw: dict) -> None:
    bad = copy.deepcopy(raw)
    bad["seeds"]["class_map"]["Dead"] = "snag"
    with pytest.raises(GenfusionError, match=r"maps 'Dead' to 'snag', which is not in classes \['tree'\]"):
        parse_params(bad)


def test_missing_file_and_bad_yaml_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(GenfusionError, match=r"nope\.yaml: params file not found"):
        load_params(tmp_path / "nope.yaml")
    broken = tmp_path / "params.yaml"
    broken.write_text("seeds: [unclosed\n")
    with pytest.raises(GenfusionError, match=r"params\.yaml: not valid YAML"):
        load_params(broken)


def with_subject(raw: dict, **subject) -> dict:
    raw["subjects"] = {"canopy": {"instance_prompt": "an aerial photo of sks tree crowns", **subject}}
    return raw


def test_subject_class_prompt_defaults_to_the_base_models(raw: dict) -> None:
    params = parse_params(with_subject(raw))
    assert params.subject("canopy").class_prompt == params.diffusion.class_prompt
    with pytest.raises(GenfusionError, match=r"no subject 'conifers'; params\.yaml defines \['canopy'\]"):
        params.subject("conifers")


def test_subject_finetune_overrides_are_validated_with_close_matches(raw: dict) -> None:
    params = parse_params(with_subject(raw, finetune={"steps": 7, "method": "full"}))
    assert (params.finetune_for("canopy").steps, params.finetune_for("canopy").method) == (7, "full")
    assert params.finetune.steps != 7  # the shared section is untouched
    with pytest.raises(
        GenfusionError, match=r"subjects\.canopy\.finetune: stpes: unknown key; did you mean 'steps'"
    ):
        parse_params(with_subject(raw, finetune={"stpes": 7}))


def test_unknown_key_inside_a_subject_suggests_the_close_match(raw: dict) -> None:
    with pytest.raises(
        GenfusionError, match=r"subjects\.canopy\.instance_promt: unknown key; did you mean 'instance_prompt'"
    ):
        parse_params(with_subject(raw, instance_promt="x"))
    with pytest.raises(
        GenfusionError, match=r"subjects\.canopy\.select\.classes: \['apple'\] are not in classes"
    ):
        parse_params(with_subject(raw, select={"classes": ["apple"]}))


def test_mixed_precision_has_no_yaml_boolean_value(raw: dict) -> None:
    raw["finetune"] = yaml.safe_load("mixed_precision: no")  # YAML reads this as false
    with pytest.raises(
        GenfusionError, match=r"finetune\.mixed_precision: Input should be 'fp32', 'fp16' or 'bf16'"
    ):
        parse_params(raw)


def test_every_shipped_profile_is_valid_and_becomes_overrides() -> None:
    for profile in sorted((ROOT / "profiles").glob("*.yaml")):
        overrides = profile_overrides(profile, ROOT / "params.yaml")
        assert overrides and all("=" in o for o in overrides), profile


def test_profile_overrides_flatten_quote_and_sweep(tmp_path: Path) -> None:
    profile = tmp_path / "p.yaml"
    profile.write_text(
        yaml.safe_dump(
            {
                "train": {"seeds": [0, 1], "device": "0", "same_steps": False},
                "diffusion": {"class_prompt": "trees, seen from above"},
                "sweep": {"variations.per_image": [0, 2, 10]},
            },
            sort_keys=False,
        )
    )
    assert profile_overrides(profile, ROOT / "params.yaml") == [
        "train.seeds=[0,1]",
        "train.device='0'",
        "train.same_steps=false",
        "diffusion.class_prompt='trees, seen from above'",
        "variations.per_image=0,2,10",
    ]
    trials = profile_trials(profile, ROOT / "params.yaml")
    assert [t[-1] for t in trials] == [
        "variations.per_image=0",
        "variations.per_image=2",
        "variations.per_image=10",
    ]
    assert all(
        t[:-1] == trials[0][:-1] == profile_overrides(profile, ROOT / "params.yaml")[:-1] for t in trials
    )


def test_profile_is_validated_for_every_sweep_value_before_anything_runs(tmp_path: Path) -> None:
    profile = tmp_path / "p.yaml"
    profile.write_text(yaml.safe_dump({"sweep": {"variations.strength": [0.3, 1.5]}}))
    with pytest.raises(
        GenfusionError,
        match=r"/p.yaml: variations.strength: Input should be less than or equal to 1 \(got 1.5\)$",
    ):
        profile_overrides(profile, ROOT / "params.yaml")
    profile.write_text(yaml.safe_dump({"trian": {"epochs": 3}}))
    with pytest.raises(GenfusionError, match="trian: unknown key; did you mean 'train'"):
        profile_overrides(profile, ROOT / "params.yaml")
    profile.write_text(yaml.safe_dump({"sweep": {"train.epochs": 3}}))
    with pytest.raises(GenfusionError, match="sweep: maps dotted keys to non-empty lists"):
        profile_overrides(profile, ROOT / "params.yaml")


def test_a_trained_variant_must_be_built(raw: dict) -> None:
    raw["train"]["variants"] = ["real", "mixed"]
    raw["train"]["init_from"] = []
    raw["datasets"]["variants"] = ["variations"]
    with pytest.raises(GenfusionError, match=r"train.variants: \['mixed'\] are not built"):
        parse_params(raw)


def test_params_yaml_writes_out_the_code_defaults() -> None:
    """params.yaml and the typed params agree on every default: one source, no drift."""
    from genfusion.params import Params, flatten

    written = yaml.safe_load((ROOT / "params.yaml").read_text())
    # What only the project can say (its classes, its seeds, its subjects) has no default.
    project = {
        "classes": written["classes"],
        "seeds": {k: written["seeds"][k] for k in ("source", "class_map")},
    }
    defaults = flatten(Params.model_validate(project).model_dump(mode="json"))
    given = flatten(Params.model_validate(written).model_dump(mode="json"))
    drift = {
        key: (defaults.get(key), given.get(key))
        for key in set(defaults) | set(given)
        if not key.startswith("subjects") and defaults.get(key) != given.get(key)
    }
    assert not drift, f"params.yaml and genfusion.params disagree (default, params.yaml): {drift}"


@pytest.mark.parametrize("debug", [[], ["-v"], ["GENFUSION_DEBUG=1"]])
def test_an_error_is_one_line_and_debug_shows_its_original_traceback(
    tmp_path: Path, debug: list[str]
) -> None:
    import os
    import subprocess
    import sys

    flags = [d for d in debug if d.startswith("-")]
    env = {k: v for k, v in os.environ.items() if k != "GENFUSION_DEBUG"}
    env |= dict(d.split("=") for d in debug if "=" in d)
    done = subprocess.run(
        [sys.executable, "-m", "genfusion.cli", *flags, "params", "--params", str(tmp_path / "none.yaml")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 2
    assert f"error: {tmp_path / 'none.yaml'}: params file not found" in done.stderr
    # The cause (a FileNotFoundError) is shown only when asked for.
    assert ("Traceback" in done.stderr and "FileNotFoundError" in done.stderr) == bool(debug)


def test_each_problem_is_one_line_naming_the_file_and_key_without_the_section_or_a_second_got(
    raw: dict,
) -> None:
    raw["train"]["imgsz"] = 100
    raw["seeds"]["tile_size"] = 1
    raw["composite"]["scale"] = [2, 1]
    with pytest.raises(GenfusionError) as caught:
        parse_params(raw, Path("p.yaml"))
    assert str(caught.value).splitlines() == [
        "p.yaml: seeds: tile_overlap (64) must be smaller than tile_size (1)",
        "p.yaml: train.imgsz: must be a multiple of 32 (YOLO's stride), got 100",
        "p.yaml: composite: scale is [min, max], got [2.0, 1.0]",
    ]
