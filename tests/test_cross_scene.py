"""Leave-one-scene-out folds as DVC experiments, pooled: on a copy of the project, tiny settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from project import attempt, commit, project_repo, run
from tiny_pipeline import TINY

from genfusion.commands.cross_scene import fold_name, folds_in, profile_of_folds, run_commands
from genfusion.commands.experiments import revisions
from genfusion.errors import GenfusionError
from genfusion.params import load_params

ROOT = Path(__file__).resolve().parents[1]
SCENES = {"2019_YELL_2_541000_4977000_image_crop": 279, "OSBS_029": 61, "SOAP_061": 37}
# The real variant alone: a fold is then seeds, real_dataset, train, evaluate and report, without
# the diffusion stages (the report's pairing of variants is the report stage's, tested with it).
FOLD_PARAMS = TINY | {
    "train": TINY["train"] | {"variants": ["real"], "seeds": [0], "init_from": []},
    "datasets": {"variants": []},
    "evaluate": {"bootstrap": 200},
}


def test_run_queues_one_fold_per_scene_up_to_the_report(neon_seeds: Path, tmp_path: Path) -> None:
    params = load_params(ROOT / "params.yaml")
    commands = run_commands(
        params.model_copy(update={"seeds": params.seeds.model_copy(update={"source": neon_seeds})}), 2
    )
    assert commands[-1] == ["dvc", "exp", "run", "--run-all", "-j", "2"]
    queued = {c[c.index("-n") + 1]: c[c.index("-S") + 1] for c in commands[:-1]}
    assert queued == {
        fold_name(scene): f"seeds.test_scene={scene if scene[0].isalpha() else repr(scene)}"
        for scene in SCENES
    }
    assert all(c[:4] == ["dvc", "exp", "run", "--queue"] for c in commands[:-1])
    assert fold_name("plot 7/a") == "fold-plot-7-a"


def test_the_study_profile_sets_every_fold_and_a_sweep_is_refused(tmp_path: Path) -> None:
    overrides = profile_of_folds(ROOT / "profiles/study.yaml", ROOT / "params.yaml")
    study = yaml.safe_load((ROOT / "profiles/study.yaml").read_text())["train"]
    assert overrides == [
        f"train.variants=[{','.join(study['variants'])}]",
        f"train.seeds=[{','.join(map(str, study['seeds']))}]",
    ]
    params = load_params(ROOT / "params.yaml")
    # Every variant the default run builds, of which it trains a few.
    assert set(study["variants"]) == {"real", *params.datasets.variants} > set(params.train.variants)
    fold = run_commands(params, 1, overrides)[0]
    assert fold[-1] == "report" and fold[fold.index(overrides[0]) - 1] == "-S"
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
        assert fold.params.seeds.test_scene == scene and fold.name == fold_name(scene)
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
    run(repo, "genfusion", "cross-scene", "report")
    pooled = json.loads((repo / "metrics/cross_scene.json").read_text())
    table = (repo / "reports/cross_scene.md").read_text()
    assert f"{len(SCENES)} scenes, {sum(SCENES.values())} objects in all" in table
    for scene in SCENES:
        row = folds[scene].summary["test"]["real"][model]
        assert pooled["folds"][scene]["real"][model]["map50_mean"] == row["map50_mean"]
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
