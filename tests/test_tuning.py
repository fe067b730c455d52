"""`genfusion tune`: trials of a sweep on every fold, up to the val scenes, grouped and ranked.
The run itself is tested on tiny settings with the cross-scene folds (tests/test_cross_scene.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from genfusion.commands.experiments import experiments
from genfusion.commands.tuning import (
    TrialFold,
    differing,
    experiment_name,
    group_trials,
    run_commands,
    trial_id,
    trials_markdown,
)
from genfusion.errors import GenfusionError
from genfusion.params import load_params

ROOT = Path(__file__).resolve().parents[1]
SCENES = ["2019_YELL_2_541000_4977000_image_crop", "OSBS_029", "SOAP_061"]


def neon_params(neon_seeds: Path):
    params = load_params(ROOT / "params.yaml")
    return params.model_copy(update={"seeds": params.seeds.model_copy(update={"source": neon_seeds})})


def test_each_trial_is_queued_on_every_fold_up_to_validate_and_finished_ones_are_skipped(
    neon_seeds: Path,
) -> None:
    params = neon_params(neon_seeds)
    trials = [["train.variants=[real]", "train.imgsz=256"], ["train.variants=[real]", "train.imgsz=320"]]
    commands = run_commands(params, trials, 2)
    assert commands[-1] == ["dvc", "exp", "run", "--run-all", "-j", "2"]
    queued = commands[:-1]
    assert len(queued) == len(trials) * len(SCENES)
    assert all(c[:4] == ["dvc", "exp", "run", "--queue"] and c[-1] == "validate" for c in queued)
    names = [c[c.index("-n") + 1] for c in queued]
    assert names == [experiment_name(trial_id(t), s) for t in trials for s in SCENES]
    assert len(set(names)) == len(names) and trial_id(trials[0]) != trial_id(trials[1])
    first = queued[0]
    assert first[first.index("-n") + 2 :][:2] == ["-S", f"seeds.test_scene='{SCENES[0]}'"]
    assert "train.imgsz=256" in first
    # A stopped run picks up where it was: finished experiments are not queued again.
    left = run_commands(params, trials, 1, done=set(names[:4]))
    assert [c[c.index("-n") + 1] for c in left[:-1]] == names[4:]
    assert run_commands(params, trials, 1, done=set(names)) == []


def fold(name: str, scene: str, settings: dict, map50: float = 0.1) -> TrialFold:
    return TrialFold(name, name, scene, None, settings, {("real", 0): {"map50": map50}})


def test_a_trial_counts_once_it_holds_out_every_scene_and_twice_is_refused() -> None:
    a, b = {"train.imgsz": 256, "train.epochs": 100}, {"train.imgsz": 320, "train.epochs": 100}
    folds = [fold(f"a-{s}", s, a) for s in SCENES] + [fold("b-0", SCENES[0], b)]
    (trial,) = group_trials(folds, SCENES)  # b has one fold of three: not a trial yet
    assert [f.scene for f in trial] == SCENES
    assert differing([trial, [fold("b", SCENES[0], b)]]) == ["train.imgsz"]
    # The same fold run again (a later round repeating a trial) with the same scores counts once;
    # with other scores, one of the two is stale.
    (trial,) = group_trials([*folds, fold("rerun", "OSBS_029", a)], SCENES)
    assert [f.name for f in trial] == [f"a-{s}" for s in SCENES]
    with pytest.raises(
        GenfusionError, match=r"trial: scene 'OSBS_029' is held out by several experiments \(a-OSBS_029, ag"
    ):
        group_trials([*folds, fold("again", "OSBS_029", a, map50=0.2)], SCENES)


def test_only_finished_experiments_count() -> None:
    """A queued, running or failed experiment shows its baseline's metrics in `dvc exp show`
    (the shape below is DVC 3's): counting one would score the baseline as a fold."""

    def experiment(name: str, executor: dict | None) -> dict:
        return {"name": name, "executor": executor, "revs": [{"rev": name, "name": name, "data": {}}]}

    states = {"queued": {"state": "queued"}, "running": {"state": "running"}, "failed": {"state": "failed"}}
    states |= {"success": {"state": "success"}, "done": None}
    shown = [
        {"rev": "workspace", "data": {}, "experiments": None},
        {"rev": "abc", "data": {}, "experiments": [experiment(n, e) for n, e in states.items()]},
    ]
    assert [rev["name"] for rev in experiments(shown)] == ["success", "done"]
    assert [rev["name"] for rev in experiments(shown, ("running",))] == ["running"]
    # A running experiment caught while it commits has no data in DVC's output.
    unread = {
        "name": "unread",
        "executor": {"state": "running"},
        "revs": [{"rev": "u", "name": "unread", "data": None}],
    }
    shown[1]["experiments"].append(unread)
    assert [rev["name"] for rev in experiments(shown, ("running",))] == ["running", "unread"]


def test_a_variants_trials_show_their_paired_difference_to_real() -> None:
    def row(mean: float, delta: tuple[float, float, float] | None = None) -> dict:
        figures = {"seeds": 1, "map50_mean": mean, "map50_low": mean - 0.05, "map50_high": mean + 0.05}
        figures |= {"map_mean": mean / 3, "map_low": mean / 4, "map_high": mean / 2}
        if delta:
            figures |= dict(zip(("map50_delta", "map50_delta_low", "map50_delta_high"), delta, strict=True))
        return figures

    results = [
        {
            "settings": {"composite.density": density},
            "pooled": {"real": row(0.136), "composite": row(mean, delta)},
            "folds": {scene: {"real": 0.1, "composite": mean} for scene in SCENES},
            "val_scenes": 3,
            "objects": 159,
        }
        for density, mean, delta in (
            (1.0, 0.150, (0.014, -0.020, 0.040)),
            (0.5, 0.086, (-0.050, -0.107, -0.007)),
        )
    ]
    params = load_params(ROOT / "params.yaml")
    table = trials_markdown(results, ["composite.density"], "composite", params, Path("t.json")).splitlines()
    assert (
        "| rank | composite.density | composite AP50 | Δ AP50 to real | composite AP@0.5:0.95 |" in table[-4]
    )
    assert table[-2].startswith("| 1 | 1.0 | 0.150 [0.100, 0.200] | +0.014 [-0.020, +0.040] | 0.050 ")
    assert table[-1].startswith("| 2 | 0.5 | 0.086 [0.036, 0.136] | -0.050 [-0.107, -0.007] * | 0.029 ")
    assert "Δ" not in trials_markdown(results, ["composite.density"], "real", params, Path("t.json"))
