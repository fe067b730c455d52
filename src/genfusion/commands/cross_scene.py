"""`genfusion cross-scene run | report`: leave-one-scene-out folds, run as DVC experiments and pooled.

With a handful of scenes, the one test scene of the split decides every figure. Cross-scene
evaluation holds out each scene once: fold `<scene>` is the whole pipeline up to the report with
`seeds.test_scene=<scene>` (train and val share the other scenes as `seeds.split` says), run as
one DVC experiment per training seed, `fold-<scene>-seed-<n>`. Each fold retrains everything
that the split feeds (base model, fine-tuning, generation, labels, detectors), so a fold costs a
full `dvc repro`; its later seeds find the fine-tuned generators in DVC's run cache (the image
stages, resumable folders that the run cache does not keep, make their images again). `run` skips the
experiments already run with the same params, so a study stopped part way goes on where it was.

`report` reads every fold's test scene and detections from the experiments (DVC's cache), and
scores them together: pooled COCO AP over all folds' scenes, each variant's paired difference to
`real`, and bootstrap intervals that resample the cells of all the folds' scenes (and the seeds),
as the report stage does for one test set; plus a table of each fold's own figures.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from genfusion import fsio, scoring
from genfusion.commands.experiments import exp_show, experiments, run_each
from genfusion.errors import GenfusionError
from genfusion.figures import verdict_figure, verdict_rows
from genfusion.params import (
    PARAMS_MISSING,
    TEST_SET,
    Params,
    flatten,
    override_value,
    parse_params,
    profile_overrides,
    read_yaml,
    with_overrides,
)
from genfusion.scenes import ANNOTATIONS
from genfusion.stages.evaluate import model_name
from genfusion.stages.report import interval_table, markdown_table, per_seed_table

FOLD_PREFIX = "fold-"
HELD_OUT = "seeds.test_scene"
SEEDS = "train.seeds"
# The real detector that labels generated images and filters the made ones (train@real-<seed>):
# an experiment of one training seed trains no other, so it is that seed's.
LABELLER_SEED = "prelabel.seed"
# What each experiment of a study sets for itself; the rest is the study's, the same in all.
PER_EXPERIMENT = (HELD_OUT, SEEDS, LABELLER_SEED)


def scene_names(params: Params) -> list[str]:
    """The scenes of `seeds.source`, as the seeds stage names them (the image's stem)."""
    from genfusion.formats import read_annotations

    return sorted({item.image.stem for item in read_annotations(params.seeds.source, params.seeds.format)})


def fold_name(scene: str) -> str:
    """An experiment name git accepts as a ref."""
    return FOLD_PREFIX + re.sub(r"[^A-Za-z0-9_.-]+", "-", scene)


def study_name(scene: str, seed: int) -> str:
    return f"{fold_name(scene)}-seed-{seed}"


@dataclass(frozen=True)
class PlannedFold:
    """One experiment of a study: `scene` held out, the detectors of one training seed."""

    name: str
    scene: str
    seed: int
    overrides: list[str]
    flat_params: dict  # the experiment's params, flattened: what a finished one must show to count


def plan(params_data: dict, scenes: Sequence[str], overrides: Sequence[str] = ()) -> list[PlannedFold]:
    """One experiment per (seed, scene), seed by seed: a study stopped part way leaves whole seeds
    of some folds, and the second seed of a fold finds the first one's generators in DVC's run
    cache. Every experiment takes the `dvc exp run -S` overrides given for the study; its labels
    and filter come from the real detector of its own seed (`prelabel.seed`), the only one it
    trains."""
    seeds = parse_params(with_overrides(params_data, overrides)).train.seeds
    common = [override for override in overrides if override.partition("=")[0] not in PER_EXPERIMENT]
    planned = []
    for seed in seeds:
        for scene in scenes:
            own = [
                *common,
                f"{HELD_OUT}={override_value(scene)}",
                f"{SEEDS}=[{seed}]",
                f"{LABELLER_SEED}={seed}",
            ]
            settings = flatten(with_overrides(params_data, own))
            planned.append(PlannedFold(study_name(scene, seed), scene, seed, own, settings))
    return planned


def run_commands(planned: Sequence[PlannedFold], jobs: int) -> list[list[str]]:
    """Queue each planned experiment up to the report (all a fold needs), then run them."""
    commands = [
        ["dvc", "exp", "run", "--queue", "-n", fold.name, *[w for o in fold.overrides for w in ("-S", o)]]
        + ["report"]
        for fold in planned
    ]
    return [*commands, ["dvc", "exp", "run", "--run-all", "-j", str(jobs)]] if commands else []


def to_run(planned: Sequence[PlannedFold], shown: object) -> list[PlannedFold]:
    """The planned experiments that are neither queued nor running, nor finished with the same
    params on any commit (`dvc exp show --all-commits --json` output): a study goes on where it
    stopped, across commits that change nothing it runs."""
    waiting = {rev["name"] for rev in experiments(shown, ("queued", "running"))}
    folds = [rev for rev in experiments(shown) if (rev.get("name") or "").startswith(FOLD_PREFIX)]
    finished = [flatten(rev["params"]) for rev in folds]
    return [fold for fold in planned if fold.name not in waiting and fold.flat_params not in finished]


def profile_of_folds(profile: Path, params_path: Path) -> list[str]:
    """A profile's overrides for every fold (`make study`'s profiles/study.yaml). A sweep would
    make several experiments of one fold, so a profile with one is refused."""
    profile_data = read_yaml(profile, "profile not found")
    if isinstance(profile_data, dict) and "sweep" in profile_data:
        raise GenfusionError(
            f"{profile}: sweep: a fold is one experiment; give cross-scene a profile without one"
        )
    return profile_overrides(profile, params_path)


def run_main(params_path: Path, *, jobs: int, overrides: Sequence[str], dry_run: bool) -> int:
    params_data = read_yaml(params_path, PARAMS_MISSING)
    scenes = scene_names(parse_params(params_data, params_path))
    planned = plan(params_data, scenes, overrides)
    left = to_run(planned, exp_show("cross-scene", all_commits=True))
    seeds = len(planned) // len(scenes)
    print(
        f"cross-scene: {len(scenes)} folds x {seeds} seed(s); {len(left)} experiments to run"
        f" ({len(planned) - len(left)} already run or queued)"
    )
    return run_each(run_commands(left, jobs), dry_run=dry_run)


@dataclass(frozen=True)
class Fold:
    """A finished experiment holding out `scene`, with the detectors of the seeds it trained."""

    scene: str
    name: str
    rev: str
    params: Params
    settings: dict  # its params, flattened, less the held-out scene and the seeds
    summary: dict  # its metrics/summary.json


def folds_in(shown: object) -> list[Fold]:
    """The finished experiments of `dvc exp show --json` that hold out a scene."""
    return [
        Fold(
            rev["params"]["seeds"]["test_scene"],
            rev["name"],
            rev["rev"],
            parse_params(rev["params"]),
            {k: v for k, v in flatten(rev["params"]).items() if k not in PER_EXPERIMENT},
            rev["summary"],
        )
        for rev in experiments(shown)
        if (rev.get("name") or "").startswith(FOLD_PREFIX)
        and rev["summary"]
        and (rev["params"].get("seeds") or {}).get("test_scene")
    ]


def read_at(path: Path, rev: str) -> str:
    """`path` as the experiment at revision `rev` left it, from this clone's DVC cache."""
    import dvc.api
    from dvc.exceptions import PathMissingError

    try:
        return dvc.api.read(str(path), rev=rev)
    except PathMissingError as missing:
        raise GenfusionError(
            f"{path}: experiment {rev[:7]}'s copy is in neither this clone's DVC cache nor git (an"
            " experiment fetched without its data?); `dvc exp pull <remote> <experiment>` fetches"
            " it, or run the experiment here again"
        ) from missing


def held_out_set(
    revs: Mapping[int, str], rows: Sequence[str], scenes: Path, predictions: Path
) -> tuple[dict, dict[tuple[str, int], list[dict]]]:
    """One held-out scene set (`scenes`, as the first experiment left it) and every (row, seed)'s
    detections on it (`predictions`), each seed's from the experiment in `revs` that trained it."""
    truth = json.loads(read_at(scenes / ANNOTATIONS, next(iter(revs.values()))))
    detections = {
        (row, seed): json.loads(read_at(predictions / f"{row}-{seed}.json", rev))
        for seed, rev in revs.items()
        for row in rows
    }
    return truth, detections


def pooled(
    sets: Sequence[tuple[dict, dict[tuple[str, int], list[dict]]]],
) -> tuple[dict, dict[tuple[str, int], list[dict]]]:
    """Several scene sets, each with its detections, as one: image and box ids renumbered."""
    truth: dict = {"images": [], "annotations": [], "categories": None}
    detections: dict[tuple[str, int], list[dict]] = {}
    for set_truth, found in sets:
        truth["categories"] = truth["categories"] or set_truth["categories"]
        offset = len(truth["images"])  # image ids 1..n of each set follow the previous set's
        truth["images"] += [image | {"id": image["id"] + offset} for image in set_truth["images"]]
        truth["annotations"] += [
            box | {"id": len(truth["annotations"]) + i, "image_id": box["image_id"] + offset}
            for i, box in enumerate(set_truth["annotations"], start=1)
        ]
        for key, boxes in found.items():
            detections.setdefault(key, []).extend(d | {"image_id": d["image_id"] + offset} for d in boxes)
    return truth, detections


def scored(
    truth: dict, detections: dict[tuple[str, int], list[dict]], model: str, params: Params
) -> tuple[dict, int]:
    """COCO AP of every (row, seed)'s detections on one scene set, as the report stage tabulates it
    (intervals, paired differences to `real`); and the number of resampled units."""
    records = [
        {"variant": row, "seed": seed, "model": model}
        | scoring.score(scoring.match(truth, found, None), params.evaluate.pr_conf)[0]
        for (row, seed), found in detections.items()
    ]
    return interval_table(truth, detections, records, params.evaluate)


def fold_table(variants: Sequence[str], tables: Mapping[str, dict]) -> str:
    """Each fold's AP50 per variant (mean over seeds, with its interval, and the paired difference)."""
    lines = ["| held-out scene | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    for scene, table in tables.items():
        cells = []
        for variant in variants:
            row = next(iter(table[variant].values()))
            cell = f"{row['map50_mean']:.3f}"
            if "map50_low" in row:
                cell += f" [{row['map50_low']:.3f}, {row['map50_high']:.3f}]"
            if variant != "real" and row.get("map50_delta") is not None:
                cell += f", Δ {row['map50_delta']:+.3f}"
            cells.append(cell)
        lines.append(f"| {scene} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def verdict_panels(results: dict, scenes: int) -> dict[str, dict]:
    """The verdict's panels of a cross-scene summary: pooled first, then each fold."""
    panels = {f"pooled over {scenes} held-out scenes": results["pooled"]}
    return panels | {f"held out {scene}": table for scene, table in results["folds"].items()}


def study_runs(folds: Sequence[Fold], scenes: Sequence[str]) -> dict[str, dict[int, Fold]]:
    """The study's experiment for each held-out scene and training seed, checked whole: one
    study's params in all of them, every scene held out with every seed, each pair once."""
    studies = {json.dumps(fold.settings, sort_keys=True, default=str) for fold in folds}
    if len(studies) > 1:
        keys = sorted({k for f in folds for k in f.settings if f.settings.get(k) != folds[0].settings.get(k)})
        names = sorted(fold.name for fold in folds)
        raise GenfusionError(
            f"cross-scene: the fold experiments ({', '.join(names)}) differ in {', '.join(keys)};"
            " remove the stale ones with `dvc exp remove`"
        )
    runs: dict[str, dict[int, Fold]] = {}
    for fold in folds:
        for seed in fold.params.train.seeds:
            other = runs.setdefault(fold.scene, {}).setdefault(seed, fold)
            if other is not fold:
                raise GenfusionError(
                    f"cross-scene: scene {fold.scene!r} with seed {seed} is held out by several"
                    f" experiments ({other.name}, {fold.name}); remove the stale ones with `dvc exp remove`"
                )
    seeds = sorted({seed for by_seed in runs.values() for seed in by_seed})
    missing = [f"{s} (seed {seed})" for s in scenes for seed in seeds if seed not in runs.get(s, {})]
    if missing:
        raise GenfusionError(
            f"cross-scene: no finished fold holds out {', '.join(missing)}; `genfusion cross-scene"
            " run` with the study's settings runs what is missing"
        )
    return {scene: dict(sorted(runs[scene].items())) for scene in sorted(runs)}


def report_main(
    params: Params, *, scenes: Path, predictions: Path, summary: Path, markdown: Path, figure: Path
) -> None:
    # Every commit's experiments: folds run before the last commit still count.
    folds = folds_in(exp_show("cross-scene", all_commits=True))
    if not folds:
        raise GenfusionError(
            "cross-scene: no finished fold experiment; run `genfusion cross-scene run` first"
        )
    runs = study_runs(folds, scene_names(params))
    study = folds[0].params
    rows, model = study.train.rows, model_name(study.train.model)
    revs = {scene: {seed: fold.rev for seed, fold in by_seed.items()} for scene, by_seed in runs.items()}
    sets = {s: held_out_set(revs[s], rows, scenes / TEST_SET, predictions / TEST_SET) for s in runs}
    truth, detections = pooled(list(sets.values()))
    table, units = scored(truth, detections, model, params)
    results = {
        "pooled": table,
        "folds": {scene: scored(*scene_set, model, params)[0] for scene, scene_set in sets.items()},
        "experiments": {s: {seed: f.name for seed, f in by_seed.items()} for s, by_seed in runs.items()},
    }
    fsio.write_json(summary, results)
    fsio.write_png(figure, verdict_figure(verdict_rows(verdict_panels(results, len(truth["images"])))))
    cell = params.evaluate.bootstrap_cell
    unit = f"{units} cells of {cell} px" if cell else f"{units} images"
    seeds = sorted({seed for by_seed in runs.values() for seed in by_seed})
    fsio.write_text(
        markdown,
        "# Cross-scene evaluation (leave one scene out)\n\n"
        f"{len(runs)} folds, each holding out one scene as the test split ({', '.join(runs)}),"
        f" training seeds {', '.join(map(str, seeds))} ({len({f.name for f in folds})} experiments):"
        f" {len(truth['images'])} scenes, {len(truth['annotations'])} objects in all, each scored once"
        f" by the detectors that never saw it. Pooled COCO AP over every fold's scene; intervals:"
        f" {params.evaluate.bootstrap} bootstrap resamples of {unit} of all the scenes (and of the"
        " seeds); Δ is the paired difference to `real`, * when its interval excludes zero."
        " Written by `genfusion cross-scene report`.\n\n## Pooled\n\n"
        + markdown_table(table)
        + "\nPaired differences per seed:\n\n"
        + per_seed_table(table)
        + "\n## Each fold (AP50 on its held-out scene, mean over seeds [95 % interval], Δ to real)\n\n"
        + fold_table(rows, results["folds"]),
    )
