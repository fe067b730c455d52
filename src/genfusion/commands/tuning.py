"""`genfusion tune run | report`: settings chosen on the cross-scene folds' validation scenes.

A trial is one combination of a profile's `sweep:` (with the rest of the profile's params). It runs
on every fold, each scene of `seeds.source` held out in turn as the test split as `cross-scene run`
holds it out, as queued DVC experiments up to the `validate` stage: each fold's detectors are
scored on its val scene, and no detector of a trial is run on a test scene. `report` pools each
trial's val scenes over the folds, scores them as the cross-scene report scores test scenes (COCO
AP, bootstrap intervals over cells and seeds), and ranks the trials by one row's pooled AP50.

Experiments are named `tune-<trial>-fold-<scene>`, where <trial> is a digest of the trial's
overrides: `run` skips those already in `dvc exp show`, so a stopped tuning run picks up where it
was. The report groups experiments by their whole params (less the held-out scene), so a trial
run again on another commit with other defaults is another trial.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from genfusion import fsio
from genfusion.commands.cross_scene import (
    HELD_OUT,
    fold_name,
    held_out_set,
    pooled,
    scene_names,
    scored,
)
from genfusion.commands.experiments import FINISHED, exp_show, experiments, run_each
from genfusion.errors import GenfusionError
from genfusion.params import VAL_SET, Params, flatten, override_value, parse_params
from genfusion.stages.evaluate import model_name
from genfusion.stages.report import BASELINE, difference_cell, interval_cell

TUNE_PREFIX = "tune-"


def trial_id(overrides: Sequence[str]) -> str:
    return hashlib.sha1("\n".join(overrides).encode()).hexdigest()[:8]


def experiment_name(trial: str, scene: str) -> str:
    return f"{TUNE_PREFIX}{trial}-{fold_name(scene)}"


def run_commands(
    params: Params, trials: Sequence[Sequence[str]], jobs: int, done: set[str] = frozenset()
) -> list[list[str]]:
    """Queue each trial on each fold up to `validate` (skipping experiments in `done`), then run them."""
    commands = []
    for overrides in trials:
        trial = trial_id(overrides)
        for scene in scene_names(params):
            name = experiment_name(trial, scene)
            if name in done:
                continue
            settings = [word for override in overrides for word in ("-S", override)]
            held_out = ["-S", f"{HELD_OUT}={override_value(scene)}"]
            commands.append(["dvc", "exp", "run", "--queue", "-n", name, *held_out, *settings, "validate"])
    return [*commands, ["dvc", "exp", "run", "--run-all", "-j", str(jobs)]] if commands else []


def run_main(params: Params, trials: Sequence[Sequence[str]], *, jobs: int, dry_run: bool) -> int:
    # Queued and running experiments count as done too: a second `tune run` does not queue them again.
    done = {rev["name"] for rev in experiments(exp_show("tune"), (*FINISHED, "queued", "running"))}
    commands = run_commands(params, trials, jobs, done)
    queued = len(commands) - 1 if commands else 0
    print(f"tune: {len(trials)} trial(s) x {len(scene_names(params))} folds; {queued} experiments to run")
    return run_each(commands, dry_run=dry_run)


@dataclass(frozen=True)
class TrialFold:
    """One finished experiment of a trial: the fold holding out `scene`."""

    name: str
    rev: str
    scene: str
    params: Params
    settings: dict  # the experiment's params, flattened, less the held-out scene
    val: dict[tuple[str, int], dict]  # metrics/val/<row>-<seed>.json by (row, seed)


def trial_folds(shown: object) -> list[TrialFold]:
    """The finished tuning experiments in `dvc exp show --json` output: each has the val metrics
    of every row and seed it trains (an experiment's other metrics files are its baseline's)."""
    found = []
    for rev in experiments(shown):
        name = rev.get("name") or ""
        scene = (rev["params"].get("seeds") or {}).get("test_scene")
        if not name.startswith(TUNE_PREFIX) or not scene or rev.get("error"):
            continue
        params = parse_params(rev["params"])
        metrics = rev["data"].get("metrics") or {}
        keys = [(row, seed) for row in params.train.variants for seed in params.train.seeds]
        val = {key: (metrics.get(f"metrics/val/{key[0]}-{key[1]}.json") or {}).get("data") for key in keys}
        if all(val.values()):
            settings = {k: v for k, v in flatten(rev["params"]).items() if k != HELD_OUT}
            found.append(TrialFold(name, rev["rev"], scene, params, settings, val))
    return found


def refuse_a_scene_held_out_twice(folds: Sequence[TrialFold], what: str) -> None:
    """A trial's folds hold out each scene once; two experiments of one scene are a stale one and
    a new one."""
    held_out = [fold.scene for fold in folds]
    twice = sorted({scene for scene in held_out if held_out.count(scene) > 1})
    if twice:
        names = [fold.name for fold in folds if fold.scene == twice[0]]
        raise GenfusionError(
            f"{what}: scene {twice[0]!r} is held out by several experiments ({', '.join(names)});"
            " remove the stale ones with `dvc exp remove`"
        )


def group_trials(folds: Sequence[TrialFold], scenes: Sequence[str]) -> list[list[TrialFold]]:
    """The trials that hold out every scene once, each a list of its folds by scene. A fold run
    again with the same params (a later round's trial that repeats an earlier one, on another
    commit) counts once when its val metrics are the same; when they differ, one is stale."""
    groups: dict[str, list[TrialFold]] = {}
    for fold in folds:
        group = groups.setdefault(json.dumps(fold.settings, sort_keys=True, default=str), [])
        if not any(other.scene == fold.scene and other.val == fold.val for other in group):
            group.append(fold)
    trials = []
    for group in groups.values():
        refuse_a_scene_held_out_twice(group, "tune: a trial")
        if set(scenes) <= {fold.scene for fold in group}:
            trials.append(sorted(group, key=lambda fold: fold.scene))
    return trials


def differing(trials: Sequence[Sequence[TrialFold]]) -> list[str]:
    """The params keys whose values differ between trials: what the table shows of each."""
    keys = sorted({key for trial in trials for key in trial[0].settings})
    return [key for key in keys if len({json.dumps(t[0].settings.get(key)) for t in trials}) > 1]


def score_trial(trial: Sequence[TrialFold], scenes: Path, predictions: Path, params: Params) -> dict:
    """A trial's val scenes pooled over its folds: every row's AP with intervals and its difference
    to `real`, as the cross-scene report gives for the test scenes, and each fold's own AP50."""
    rows, seeds = trial[0].params.train.variants, trial[0].params.train.seeds
    revs = [dict.fromkeys(seeds, fold.rev) for fold in trial]
    sets = [held_out_set(by_seed, rows, scenes / VAL_SET, predictions / VAL_SET) for by_seed in revs]
    truth, detections = pooled(sets)
    table, _ = scored(truth, detections, model_name(trial[0].params.train.model), params)
    folds = {
        fold.scene: {row: sum(fold.val[(row, s)]["map50"] for s in seeds) / len(seeds) for row in rows}
        for fold in trial
    }
    return {
        "experiments": [fold.name for fold in trial],
        "val_scenes": len(truth["images"]),
        "objects": len(truth["annotations"]),
        "pooled": {row: next(iter(models.values())) for row, models in table.items()},
        "folds": folds,
    }


def trials_markdown(
    results: Sequence[dict], keys: Sequence[str], by: str, params: Params, summary: Path
) -> str:
    scenes = list(results[0]["folds"])
    # A variant's trials show its paired difference to the baseline trained beside it.
    paired = by != BASELINE
    header = ["rank", *keys, f"{by} AP50", *[f"Δ AP50 to {BASELINE}"] * paired, f"{by} AP@0.5:0.95"]
    header += [f"val AP50, fold {s}" for s in scenes]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for rank, result in enumerate(results, start=1):
        row = result["pooled"][by]
        cells = [str(rank), *(json.dumps(result["settings"].get(k)) for k in keys)]
        cells += [interval_cell(row, "map50"), *[difference_cell(row, "map50")] * paired]
        cells += [interval_cell(row, "map")]
        cells += [f"{result['folds'][s][by]:.3f}" for s in scenes]
        lines.append("| " + " | ".join(cells) + " |")
    first = results[0]
    cell = params.evaluate.bootstrap_cell
    settings = [re.escape(key) for key in [HELD_OUT, *keys]]
    columns = "|".join(["Experiment", f"metrics/val/{by}-.*:map50$", *settings])
    return (
        "# Tuning on the validation scenes\n\n"
        f"{len(results)} trials, each run on {len(scenes)} folds (every scene held out in turn as the"
        f" test split, which no trial's detector is run on). Each row is the trial's `{by}` detectors"
        f" scored on the folds' val scenes pooled ({first['val_scenes']} scenes, {first['objects']}"
        f" objects): COCO AP, mean over {first['pooled'][by]['seeds']} seed(s) with its 95 % interval"
        f" ({params.evaluate.bootstrap} bootstrap resamples of {cell} px cells and of the seeds), then"
        f" each fold's own val AP50. Ranked by pooled AP50; the columns before it are the params that"
        " differ between trials. Written by `genfusion tune report`; each fold is an experiment"
        f" named in `{summary.as_posix()}`; every fold's val AP50 is shown with:\n\n"
        f"    dvc exp show --all-commits --md --drop '.*' --keep '{columns}'"
        "\n\n" + "\n".join(lines) + "\n"
    )


def report_main(
    params: Params, *, scenes: Path, predictions: Path, by: str, summary: Path, markdown: Path
) -> None:
    folds = trial_folds(exp_show("tune", all_commits=True))
    finished = group_trials(folds, scene_names(params))
    if not finished:
        raise GenfusionError("tune: no trial has finished on every fold; run `genfusion tune run` first")
    # The trials that train the ranking row: a clone that tuned `real` alone, then a variant's
    # settings beside `real`, ranks each set with its own --by.
    trials = [trial for trial in finished if by in trial[0].params.train.variants]
    if not trials:
        raise GenfusionError(
            f"tune: --by {by}: none of the {len(finished)} finished trials trains a {by!r} detector"
        )
    keys = differing(trials)
    results = []
    for trial in trials:
        result = score_trial(trial, scenes, predictions, params)
        results.append({"settings": {k: trial[0].settings.get(k) for k in keys}} | result)
    results.sort(key=lambda r: -r["pooled"][by]["map50_mean"])
    fsio.write_json(summary, {"by": by, "trials": results})
    fsio.write_text(markdown, trials_markdown(results, keys, by, params, summary))
