"""Leave-one-scene-out folds as DVC experiments, pooled: on a copy of the project, tiny settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from project import attempt, commit, project_repo, run
from tiny_pipeline import TINY

from genfusion.commands.cross_scene import (
    Fold,
    fold_name,
    folds_in,
    plan,
    profile_of_folds,
    run_commands,
    study_name,
    study_runs,
    to_run,
)
from genfusion.commands.experiments import revisions
from genfusion.errors import GenfusionError
from genfusion.params import load_params, with_overrides

ROOT = Path(__file__).resolve().parents[1]
SCENES = {"2019_YELL_2_541000_4977000_image_crop": 279, "OSBS_029": 61, "SOAP_061": 37}
# The real variant alone: a fold is then seeds, real_dataset, train, evaluate and report, without
# the diffusion stages (the report's pairing of variants is the report stage's, tested with it).
FOLD_PARAMS = TINY | {
    "train": TINY["train"] | {"variants": ["real"], "seeds": [0], "init_from": []},
    "datasets": {"variants": []},
    "evaluate": {"bootstrap": 200},
}


def test_run_queues_one_experiment_per_seed_and_scene_up_to_the_report() -> None:
    params_data = yaml.safe_load((ROOT / "params.yaml").read_text())
    planned = plan(params_data, list(SCENES), ["train.variants=[real,composite]", "train.seeds=[0,1]"])
    # Seed by seed: a study stopped part way has whole seeds of some folds.
    assert [(fold.seed, fold.scene) for fold in planned] == [(seed, s) for seed in (0, 1) for s in SCENES]
    assert [fold.name for fold in planned] == [study_name(f.scene, f.seed) for f in planned]
    assert len({fold.name for fold in planned}) == len(planned)
    commands = run_commands(planned, 2)
    assert commands[-1] == ["dvc", "exp", "run", "--run-all", "-j", "2"]
    for fold, command in zip(planned, commands[:-1], strict=True):
        assert command[:6] == ["dvc", "exp", "run", "--queue", "-n", fold.name] and command[-1] == "report"
        settings = [command[i + 1] for i, word in enumerate(command) if word == "-S"]
        scene = fold.scene if fold.scene[0].isalpha() else repr(fold.scene)
        # The study's seeds become one seed per experiment, whose real detector of that seed
        # labels and filters (the only real detector it trains); every other override is kept.
        assert settings == [
            "train.variants=[real,composite]",
            f"seeds.test_scene={scene}",
            f"train.seeds=[{fold.seed}]",
            f"prelabel.seed={fold.seed}",
        ]
        assert fold.flat_params["train.seeds"] == [fold.seed]
        assert fold.flat_params["prelabel.seed"] == fold.seed
        assert fold.flat_params["seeds.test_scene"] == fold.scene
        assert fold.flat_params["train.variants"] == ["real", "composite"]
    assert fold_name("plot 7/a") == "fold-plot-7-a" and study_name("plot 7/a", 2) == "fold-plot-7-a-seed-2"
    assert run_commands([], 2) == []
    with pytest.raises(GenfusionError, match=r"-S 'train.seeds': an override is key=value"):
        plan(params_data, list(SCENES), ["train.seeds"])


def shown_of(*experiments: tuple[str, dict | None, dict]) -> list[dict]:
    """`dvc exp show --all-commits --json` output (DVC 3's shape) of (name, executor, params)."""

    def experiment(name: str, executor: dict | None, params: dict) -> dict:
        data = {"params": {"params.yaml": {"data": params}}}
        return {"name": name, "executor": executor, "revs": [{"rev": name, "name": name, "data": data}]}

    return [{"rev": "abc", "data": {}, "experiments": [experiment(*e) for e in experiments]}]


def test_a_study_goes_on_where_it_stopped() -> None:
    params_data = yaml.safe_load((ROOT / "params.yaml").read_text())
    planned = plan(params_data, list(SCENES), ["train.seeds=[0,1]"])
    first, second, third = planned[:3]
    # Nested as DVC shows them: the flattened params of a finished fold, less nothing.
    nested = with_overrides(params_data, first.overrides)
    other = with_overrides(params_data, [*second.overrides, "train.epochs=7"])
    shown = shown_of(
        (first.name, None, nested),  # finished with the same params, on any commit
        (second.name, {"state": "success"}, other),  # finished with other params: run again
        (third.name, {"state": "queued"}, {}),  # queued: not queued twice
        ("tune-1234-" + fold_name(planned[3].scene), None, with_overrides(params_data, planned[3].overrides)),
    )
    # The tuning experiment stops at `validate`: it counts for no fold, even with the same params.
    assert [fold.name for fold in to_run(planned, shown)] == [second.name, *[f.name for f in planned[3:]]]


def fold_of(name: str, scene: str, seeds: list[int], **settings: object) -> Fold:
    params = load_params(ROOT / "params.yaml")
    params = params.model_copy(update={"train": params.train.model_copy(update={"seeds": seeds})})
    return Fold(scene, name, name, params, {"train.epochs": 200} | settings, {})


def test_the_report_takes_one_experiment_per_scene_and_seed_of_one_study() -> None:
    folds = [fold_of(study_name(s, seed), s, [seed]) for seed in (0, 1) for s in SCENES]
    runs = study_runs(folds, list(SCENES))
    assert list(runs) == sorted(SCENES)
    assert {scene: {seed: f.name for seed, f in by_seed.items()} for scene, by_seed in runs.items()} == {
        s: {0: study_name(s, 0), 1: study_name(s, 1)} for s in SCENES
    }
    # A fold of all the seeds at once (as studies before this one ran) counts for each of them.
    whole = [fold_of(fold_name(s), s, [0, 1]) for s in SCENES]
    assert study_runs(whole, list(SCENES))["OSBS_029"] == {0: whole[1], 1: whole[1]}
    with pytest.raises(GenfusionError, match=r"'OSBS_029' with seed 0 is held out by several experiments"):
        study_runs([*folds, whole[1]], list(SCENES))
    with pytest.raises(GenfusionError, match=r"no finished fold holds out SOAP_061 \(seed 1\);"):
        study_runs(folds[:-1], list(SCENES))
    stale = fold_of("old", "OSBS_029", [2], **{"train.epochs": 100})
    with pytest.raises(GenfusionError, match=r"differ in train.epochs; remove the stale ones"):
        study_runs([*folds, stale], list(SCENES))


def test_the_study_profile_sets_every_fold_and_a_sweep_is_refused(tmp_path: Path) -> None:
    overrides = profile_of_folds(ROOT / "profiles/study.yaml", ROOT / "params.yaml")
    study = yaml.safe_load((ROOT / "profiles/study.yaml").read_text())["train"]
    assert overrides == [
        "threads=1",  # two experiments at once (`make study` gives --jobs 2), one core each
        f"train.variants=[{','.join(study['variants'])}]",
        f"train.seeds=[{','.join(map(str, study['seeds']))}]",
    ]
    params = load_params(ROOT / "params.yaml")
    # Every variant the default run builds, of which it trains a few.
    assert set(study["variants"]) == {"real", *params.datasets.variants} > set(params.train.variants)
    planned = plan(yaml.safe_load((ROOT / "params.yaml").read_text()), list(SCENES), overrides)
    assert len(planned) == len(SCENES) * len(study["seeds"])
    assert f"-S {overrides[0]}" in " ".join(run_commands(planned, 1)[0])
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("sweep:\n  train.epochs: [10, 20]\n")
    with pytest.raises(GenfusionError, match=r"sweep.yaml: sweep: a fold is one experiment"):
        profile_of_folds(sweep, ROOT / "params.yaml")


@pytest.mark.integration
def test_folds_hold_out_each_scene_and_pool_every_object(tmp_path_factory: pytest.TempPathFactory) -> None:
    repo = project_repo(tmp_path_factory.mktemp("folds"), FOLD_PARAMS)
    run(repo, "dvc", "pull", "-q", "data/seeds/neon-trees.dvc")
    # A user's pretrained weights, made here (random, the default architecture), versioned with
    # DVC: the study runs from them with one setting (docs/results.md).
    from ultralytics import YOLO

    weights = "models/pretrained/local.pt"
    model = Path(weights).stem  # the detector's name in the metrics
    YOLO(load_params(repo / "params.yaml").train.model).save(repo / weights)
    run(repo, "dvc", "add", "-q", weights)
    commit(repo, "pretrained weights")
    run(repo, "genfusion", "cross-scene", "run", "-S", f"train.model={weights}")
    shown = json.loads(run(repo, "dvc", "exp", "show", "--json"))
    folds = {fold.scene: fold for fold in folds_in(shown)}
    revs = {rev["name"]: rev["rev"] for rev in revisions(shown)}
    assert set(folds) == set(SCENES)
    for scene, fold in folds.items():
        assert set(fold.summary["test"]) == {"real"}
        assert fold.params.seeds.test_scene == scene and fold.name == study_name(scene, 0)
        # Every fold's detector started from those weights (that train loads them, rather than
        # the architecture only, is tests/test_train.py's).
        assert fold.params.train.model == weights
        lock = yaml.safe_load(run(repo, "git", "show", f"{revs[fold.name]}:dvc.lock"))
        train = lock["stages"]["train@real-0"]
        assert train["params"]["params.yaml"]["train.model"] == weights
        # The folder the stage read held the weights: DVC's count and size of its files.
        (folder,) = (dep for dep in train["deps"] if dep["path"] == "models/pretrained")
        files = [f for f in (repo / "models/pretrained").iterdir() if f.is_file()]
        assert (folder["nfiles"], folder["size"]) == (len(files), sum(f.stat().st_size for f in files))
    # Run again, the study finds every fold done, by the params DVC recorded for each.
    again = run(repo, "genfusion", "cross-scene", "run", "-S", f"train.model={weights}", "--dry-run")
    assert "3 folds x 1 seed(s); 0 experiments to run (3 already run or queued)" in again
    assert "dvc exp run" not in again
    run(repo, "genfusion", "cross-scene", "report")
    pooled = json.loads((repo / "metrics/cross_scene.json").read_text())
    assert pooled["experiments"] == {scene: {"0": study_name(scene, 0)} for scene in sorted(SCENES)}
    table = (repo / "reports/cross_scene.md").read_text()
    assert f"{len(SCENES)} scenes, {sum(SCENES.values())} objects in all" in table
    for scene in SCENES:
        # Each fold's figures, scored again from its detections, are its own report's (which
        # adds the training set's size).
        row = folds[scene].summary["test"]["real"][model]
        assert pooled["folds"][scene]["real"][model].items() < row.items()
        assert f"| {scene} | {row['map50_mean']:.3f}" in table
    real = pooled["pooled"]["real"][model]
    assert real["seeds"] == 1
    # A percentile interval of AP need not hold the point estimate (AP is no mean of the cells).
    assert 0 <= real["map50_low"] <= real["map50_high"] <= 1
    before = table
    run(repo, "genfusion", "cross-scene", "report")
    assert (repo / "reports/cross_scene.md").read_text() == before  # the same resamples every time

    # Tuning on the same folds, up to the val scenes only: one trial with the folds' own settings
    # (their weights), so DVC's run cache restores its stages and its val scores must be the
    # folds' (more trials cost more experiments and test nothing more here: their grouping is
    # tests/test_tuning.py's).
    (repo / "tune.yaml").write_text(yaml.safe_dump({"sweep": {"train.model": [weights]}}))
    run(repo, "genfusion", "tune", "run", "tune.yaml")
    again = run(repo, "genfusion", "tune", "run", "tune.yaml", "--dry-run")
    assert "1 trial(s) x 3 folds; 0 experiments to run" in again and "dvc exp run" not in again
    run(repo, "genfusion", "tune", "report")
    (trial,) = json.loads((repo / "metrics/tuning.json").read_text())["trials"]
    shown = {rev["name"]: rev for rev in revisions(json.loads(run(repo, "dvc", "exp", "show", "--json")))}
    fold_val = {
        scene: shown[fold.name]["data"]["metrics"]["metrics/val/real-0.json"]["data"]
        for scene, fold in folds.items()
    }
    assert trial["folds"] == {scene: {"real": val["map50"]} for scene, val in fold_val.items()}
    assert trial["objects"] == sum(val["objects"] for val in fold_val.values())
    assert 0 <= trial["pooled"]["real"]["map50_low"] <= trial["pooled"]["real"]["map50_high"] <= 1
    for name in trial["experiments"]:  # no detector of a trial ran on a test scene
        lock = yaml.safe_load(run(repo, "git", "show", f"{shown[name]['rev']}:dvc.lock"))
        assert "validate@real-0" in lock["stages"]
        assert not [stage for stage in lock["stages"] if "evaluate" in stage]
    assert "| 1 | 0." in (repo / "reports/tuning.md").read_text()
    done = attempt(repo, "genfusion", "tune", "report", "--by", "composite")
    assert done.returncode == 2 and "none of the 1 finished trials trains a 'composite'" in done.stderr

    # A trial's outputs missing from this clone's cache, as after fetching its experiments'
    # refs alone: the report names the file and how to fetch it, and leaves the last report as is.
    predictions = "data/predictions/val/real-0.json"
    lock = yaml.safe_load(run(repo, "git", "show", f"{shown[trial['experiments'][0]]['rev']}:dvc.lock"))
    (md5,) = (out["md5"] for out in lock["stages"]["validate@real-0"]["outs"] if out["path"] == predictions)
    (repo / ".dvc/cache/files/md5" / md5[:2] / md5[2:]).unlink()
    before = (repo / "reports/tuning.md").read_text()
    done = attempt(repo, "genfusion", "tune", "report")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert predictions in done.stderr and "dvc exp pull" in done.stderr
    assert (repo / "reports/tuning.md").read_text() == before
