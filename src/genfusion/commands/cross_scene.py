"""`genfusion cross-scene run | report`: leave-one-scene-out folds, run as DVC experiments and pooled.

With a handful of scenes, the one test scene of the split decides every figure. Cross-scene
evaluation holds out each scene once: fold `<scene>` is the whole pipeline up to the report with
`seeds.test_scene=<scene>` (train and val share the other scenes as `seeds.split` says), run as a
DVC experiment named `fold-<scene>`. Each fold retrains everything that the split feeds (base
model, fine-tuning, generation, labels, detectors), so a fold costs a full `dvc repro`.

`report` reads every fold's test scene and detections from the experiments (DVC's cache), and
scores them together: pooled COCO AP over all folds' scenes, each variant's paired difference to
`real`, and bootstrap intervals that resample the cells of all the folds' scenes (and the seeds),
as the report stage does for one test set; plus a table of each fold's own figures.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from genfusion import fsio, scoring
from genfusion.commands.experiments import exp_show, experiments, run_each
from genfusion.errors import GenfusionError
from genfusion.figures import verdict_figure, verdict_rows
from genfusion.params import TEST_SET, Params, override_value, parse_params, profile_overrides, read_yaml
from genfusion.scenes import ANNOTATIONS
from genfusion.stages.evaluate import model_name
from genfusion.stages.report import interval_table, markdown_table, per_seed_table

FOLD_PREFIX = "fold-"


def scene_names(params: Params) -> list[str]:
    """The scenes of `seeds.source`, as the seeds stage names them (the image's stem)."""
    from genfusion.formats import read_annotations

    return sorted({item.image.stem for item in read_annotations(params.seeds.source, params.seeds.format)})


def fold_name(scene: str) -> str:
    """An experiment name git accepts as a ref."""
    return FOLD_PREFIX + re.sub(r"[^A-Za-z0-9_.-]+", "-", scene)


def run_commands(params: Params, jobs: int, overrides: Sequence[str] = ()) -> list[list[str]]:
    """Queue one experiment per scene (up to the report, which is all a fold needs), with the
    `dvc exp run -S` overrides given for every fold, then run them."""
    common = [word for override in overrides for word in ("-S", override)]
    commands = []
    for scene in scene_names(params):
        held_out = ["-S", f"seeds.test_scene={override_value(scene)}"]
        commands.append(
            ["dvc", "exp", "run", "--queue", "-n", fold_name(scene), *held_out, *common, "report"]
        )
    return [*commands, ["dvc", "exp", "run", "--run-all", "-j", str(jobs)]]


def profile_of_folds(profile: Path, params_path: Path) -> list[str]:
    """A profile's overrides for every fold (`make study`'s profiles/study.yaml). A sweep would
    make several experiments of one fold, so a profile with one is refused."""
    profile_data = read_yaml(profile, "profile not found")
    if isinstance(profile_data, dict) and "sweep" in profile_data:
        raise GenfusionError(
            f"{profile}: sweep: a fold is one experiment; give cross-scene a profile without one"
        )
    return profile_overrides(profile, params_path)


def run_main(params: Params, *, jobs: int, overrides: Sequence[str], dry_run: bool) -> int:
    return run_each(run_commands(params, jobs, overrides), dry_run=dry_run)


@dataclass(frozen=True)
class Fold:
    scene: str
    name: str
    rev: str
    params: Params
    summary: dict  # the fold's metrics/summary.json


def folds_in(shown: object) -> list[Fold]:
    """The finished experiments of `dvc exp show --json` that hold out a scene."""
    return [
        Fold(
            rev["params"]["seeds"]["test_scene"],
            rev["name"],
            rev["rev"],
            parse_params(rev["params"]),
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


def pooled(
    runs: Sequence[tuple[str, Sequence[str], Sequence[int]]], scenes: Path, predictions: Path
) -> tuple[dict, dict[tuple[str, int], list[dict]]]:
    """Each run's scene set (`scenes`, read at the run's revision) as one ground truth, and every
    (row, seed)'s detections on it from `predictions`; a run is (experiment revision, rows, seeds)."""
    truth: dict = {"images": [], "annotations": [], "categories": None}
    detections: dict[tuple[str, int], list[dict]] = {}
    for rev, rows, seeds in runs:
        run_truth = json.loads(read_at(scenes / ANNOTATIONS, rev))
        truth["categories"] = truth["categories"] or run_truth["categories"]
        offset = len(truth["images"])  # image ids 1..n of each run follow the previous run's
        truth["images"] += [image | {"id": image["id"] + offset} for image in run_truth["images"]]
        truth["annotations"] += [
            box | {"id": len(truth["annotations"]) + i, "image_id": box["image_id"] + offset}
            for i, box in enumerate(run_truth["annotations"], start=1)
        ]
        for row in rows:
            for seed in seeds:
                found = json.loads(read_at(predictions / f"{row}-{seed}.json", rev))
                detections.setdefault((row, seed), []).extend(
                    d | {"image_id": d["image_id"] + offset} for d in found
                )
    return truth, detections


def fold_table(folds: Sequence[Fold]) -> str:
    """Each fold's AP50 per variant (mean over seeds, with its interval, and the paired difference)."""
    variants = folds[0].params.train.rows
    lines = ["| held-out scene | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    for fold in folds:
        cells = []
        for variant in variants:
            row = next(iter(fold.summary["test"][variant].values()))
            cell = f"{row['map50_mean']:.3f}"
            if "map50_low" in row:
                cell += f" [{row['map50_low']:.3f}, {row['map50_high']:.3f}]"
            if variant != "real" and row.get("map50_delta") is not None:
                cell += f", Δ {row['map50_delta']:+.3f}"
            cells.append(cell)
        lines.append(f"| {fold.scene} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def verdict_panels(results: dict, scenes: int) -> dict[str, dict]:
    """The verdict's panels of a cross-scene summary: pooled first, then each fold."""
    panels = {f"pooled over {scenes} held-out scenes": results["pooled"]}
    return panels | {f"held out {scene}": table for scene, table in results["folds"].items()}


def refuse_a_scene_held_out_twice(folds: Sequence[Fold], what: str) -> None:
    """Folds (of one study or one trial: anything with a `scene` and a `name`) hold out each scene
    once; two experiments of one scene are a stale one and a new one."""
    held_out = [fold.scene for fold in folds]
    twice = sorted({scene for scene in held_out if held_out.count(scene) > 1})
    if twice:
        names = [fold.name for fold in folds if fold.scene == twice[0]]
        raise GenfusionError(
            f"{what}: scene {twice[0]!r} is held out by several experiments ({', '.join(names)});"
            " remove the stale ones with `dvc exp remove`"
        )


def report_main(
    params: Params, *, scenes: Path, predictions: Path, summary: Path, markdown: Path, figure: Path
) -> None:
    # Every commit's experiments: folds run before the last commit still count.
    folds = sorted(folds_in(exp_show("cross-scene", all_commits=True)), key=lambda fold: fold.scene)
    if not folds:
        raise GenfusionError(
            "cross-scene: no finished fold experiment; run `genfusion cross-scene run` first"
        )
    refuse_a_scene_held_out_twice(folds, "cross-scene")
    held_out = [fold.scene for fold in folds]
    missing = sorted(set(scene_names(params)) - set(held_out))
    if missing:
        raise GenfusionError(
            f"cross-scene: no finished fold holds out {missing}; run `genfusion cross-scene run`"
        )
    plans = {
        (tuple(f.params.train.variants), tuple(f.params.train.seeds), f.params.train.model) for f in folds
    }
    if len(plans) > 1:
        raise GenfusionError(
            f"cross-scene: the folds train different variants, seeds or models: {sorted(plans)}"
        )
    runs = [(fold.rev, fold.params.train.rows, fold.params.train.seeds) for fold in folds]
    truth, detections = pooled(runs, scenes / TEST_SET, predictions / TEST_SET)
    model = model_name(folds[0].params.train.model)
    records = []
    for (variant, seed), found in detections.items():
        metrics, _ = scoring.score(scoring.match(truth, found, None), params.evaluate.pr_conf)
        records.append({"variant": variant, "seed": seed, "model": model, **metrics})
    table, units = interval_table(truth, detections, records, params.evaluate)
    cell = params.evaluate.bootstrap_cell
    unit = f"{units} cells of {cell} px" if cell else f"{units} images"
    results = {"pooled": table, "folds": {fold.scene: fold.summary["test"] for fold in folds}}
    fsio.write_json(summary, results)
    fsio.write_png(figure, verdict_figure(verdict_rows(verdict_panels(results, len(truth["images"])))))
    fsio.write_text(
        markdown,
        "# Cross-scene evaluation (leave one scene out)\n\n"
        f"{len(folds)} folds, each holding out one scene as the test split ({', '.join(held_out)}):"
        f" {len(truth['images'])} scenes, {len(truth['annotations'])} objects in all, each scored once"
        f" by the detectors that never saw it. Pooled COCO AP over every fold's scene; intervals:"
        f" {params.evaluate.bootstrap} bootstrap resamples of {unit} of all the scenes (and of the"
        " seeds); Δ is the paired difference to `real`, * when its interval excludes zero."
        " Written by `genfusion cross-scene report`.\n\n## Pooled\n\n"
        + markdown_table(table)
        + "\nPaired differences per seed:\n\n"
        + per_seed_table(table)
        + "\n## Each fold (AP50 on its held-out scene, mean over seeds [95 % interval], Δ to real)\n\n"
        + fold_table(folds),
    )
