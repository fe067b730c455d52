"""`report` stage: every detector on every test set, with intervals, and figures.

Rows are (variant, model); columns AP@0.5:0.95, AP50 and AP75 on whole scenes as the mean over
seeds (± the sample std when there are several), each with its 95 % bootstrap interval, and the
paired difference to the `real` variant with the same model, with its interval: the same
resampled units of the test set (see `genfusion.scoring`) score both detectors of each seed, and
seeds are resampled too when there are several. A difference whose interval excludes zero is
marked. One table per test set: the held-out test split, then each of `evaluate.extra_sets`.
Figures: every variant's precision-recall curve on the test scenes, AP50 against the number of
synthetic train images, and each variant's detections on the test scenes.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from genfusion import fsio, scoring
from genfusion.errors import GenfusionError
from genfusion.figures import verdict_figure, verdict_rows
from genfusion.params import TEST_SET
from genfusion.scene_images import open_scene
from genfusion.scenes import read_scene_set

if TYPE_CHECKING:
    from genfusion.params import EvaluateParams, Params

BOX_METRICS = (("map", "AP@0.5:0.95"), ("map50", "AP50"), ("map75", "AP75"))
# Averaged over seeds too, without intervals: the operating point, and the earlier tile-level protocol.
PLAIN_METRICS = (("precision", "precision"), ("recall", "recall"), ("tile_map50", "tile AP50"))
# Segmentation models (task: segment): mask AP, scored on the test tiles.
MASK_METRICS = (("tile_mask_map", "tile mask AP@0.5:0.95"), ("tile_mask_map50", "tile mask AP50"))
BASELINE = "real"
LEVEL = 0.95


def eval_path(eval_dir: Path, test_set: str, variant: str, seed: int) -> Path:
    """Where the evaluate stage writes a detector's scores on `test_set`."""
    folder = eval_dir if test_set == TEST_SET else eval_dir / test_set
    return folder / f"{variant}-{seed}.json"


def load_json(path: Path, stage: str):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise GenfusionError(f"{path}: missing; run `dvc repro {stage}`") from exc
    except json.JSONDecodeError as exc:
        raise GenfusionError(f"{path}: not valid JSON ({exc})") from exc


def evaluation_stage(test_set: str, variant: str, seed: int) -> str:
    return (
        f"evaluate@{variant}-{seed}"
        if test_set == TEST_SET
        else f"evaluate_extra@{variant}-{seed}-{test_set}"
    )


def load_evaluations(
    eval_dir: Path, variants: Sequence[str], seeds: Sequence[int], test_set: str = TEST_SET
) -> list[dict]:
    return [
        load_json(eval_path(eval_dir, test_set, v, s), evaluation_stage(test_set, v, s))
        for v in variants
        for s in seeds
    ]


def summarise(records: Sequence[dict]) -> dict[str, dict[str, dict]]:
    """{variant: {model: row}} with the mean and std over seeds, and the difference of the means
    to the baseline variant."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for record in records:
        groups[(record["variant"], record["model"])].append(record)
    summary: dict[str, dict[str, dict]] = defaultdict(dict)
    for (variant, model), runs in groups.items():
        row: dict = {"seeds": len(runs)}
        for key in ("train_images", "synthetic_images"):
            if key in runs[0]:
                row[key] = runs[0][key]
        for key, _ in BOX_METRICS + PLAIN_METRICS + MASK_METRICS:
            if all(key in r for r in runs):
                values = [r[key] for r in runs]
                row[f"{key}_mean"] = statistics.fmean(values)
                row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary[variant][model] = row
    for models in summary.values():
        for model, row in models.items():
            base = summary.get(BASELINE, {}).get(model)
            for key, _ in BOX_METRICS:
                row[f"{key}_delta"] = row[f"{key}_mean"] - base[f"{key}_mean"] if base else None
    return dict(summary)


def add_intervals(
    summary: dict[str, dict[str, dict]],
    records: Sequence[dict],
    samples: dict[tuple[str, int], dict[str, np.ndarray]],
    seeds: Sequence[int],
    params: EvaluateParams,
) -> None:
    """Write each row's bootstrap interval, its paired difference to the baseline per seed and
    pooled over seeds, and their intervals into `summary` (as `<metric>_low` / `_high`,
    `<metric>_delta_low` / `_high` and `paired`)."""
    points = {(r["variant"], r["seed"]): r for r in records}
    rng = np.random.default_rng(params.bootstrap_seed)
    resamples = len(next(iter(samples.values()))["map"])
    # Seeds resampled with the test units (a single seed is always itself).
    seed_draws = rng.integers(0, len(seeds), size=(resamples, len(seeds)))
    for variant, models in summary.items():
        for row in models.values():
            for key, _ in BOX_METRICS:
                runs = np.stack([samples[(variant, s)][key] for s in seeds], axis=1)  # (resamples, seeds)
                pooled = np.take_along_axis(runs, seed_draws, axis=1).mean(axis=1)
                row[f"{key}_low"], row[f"{key}_high"] = scoring.interval(pooled, LEVEL)
            if variant == BASELINE or BASELINE not in summary:
                continue
            row["paired"] = {}
            for key, _ in BOX_METRICS:
                differences = np.stack(
                    [samples[(variant, s)][key] - samples[(BASELINE, s)][key] for s in seeds], axis=1
                )
                pooled = np.take_along_axis(differences, seed_draws, axis=1).mean(axis=1)
                row[f"{key}_delta_low"], row[f"{key}_delta_high"] = scoring.interval(pooled, LEVEL)
            for seed in seeds:
                per_seed = row["paired"].setdefault(str(seed), {})
                for key, _ in BOX_METRICS:
                    difference = samples[(variant, seed)][key] - samples[(BASELINE, seed)][key]
                    per_seed[f"{key}_delta_low"], per_seed[f"{key}_delta_high"] = scoring.interval(
                        difference, LEVEL
                    )
                    per_seed[f"{key}_delta"] = points[(variant, seed)][key] - points[(BASELINE, seed)][key]


def excludes_zero(row: dict, key: str) -> bool:
    low, high = row.get(f"{key}_delta_low"), row.get(f"{key}_delta_high")
    return low is not None and (low > 0 or high < 0)


def interval_cell(row: dict, key: str, spread: bool = False) -> str:
    """`key`'s mean, with `± std` when `spread`, and its interval when the row has one."""
    cell = f"{row[f'{key}_mean']:.3f}"
    if spread:
        cell += f" ± {row[f'{key}_std']:.3f}"
    if f"{key}_low" in row:
        cell += f" [{row[f'{key}_low']:.3f}, {row[f'{key}_high']:.3f}]"
    return cell


def difference_cell(row: dict, key: str) -> str:
    """`key`'s difference to the baseline with its paired interval, `*` when that excludes zero;
    empty where the row has no difference (the baseline itself, or a run without one)."""
    delta = row.get(f"{key}_delta")
    if delta is None:
        return ""
    cell = f"{delta:+.3f}"
    if row.get(f"{key}_delta_low") is not None:
        cell += f" [{row[f'{key}_delta_low']:+.3f}, {row[f'{key}_delta_high']:+.3f}]"
        cell += " *" * excludes_zero(row, key)
    return cell


def markdown_table(summary: dict[str, dict[str, dict]]) -> str:
    rows = [row for models in summary.values() for row in models.values()]
    box = BOX_METRICS
    plain = [(k, label) for k, label in PLAIN_METRICS + MASK_METRICS if f"{k}_mean" in rows[0]]
    # Pooled folds (cross-scene) train on different images per fold: no one count to show.
    counted = "train_images" in rows[0]
    header = ["variant", "model", "seeds", *["train images"] * counted, *(label for _, label in box)]
    header += [f"Δ {label}" for _, label in box] + [label for _, label in plain]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant, models in summary.items():
        for model, row in models.items():
            cells = [variant, model, str(row["seeds"]), *[str(row.get("train_images"))] * counted]
            # One seed has no spread to show.
            cells += [interval_cell(row, key, spread=row["seeds"] > 1) for key, _ in box]
            cells += [difference_cell(row, key) if variant != BASELINE else "" for key, _ in box]
            cells += [f"{row[f'{key}_mean']:.3f}" for key, _ in plain]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def per_seed_table(summary: dict[str, dict[str, dict]]) -> str:
    """The paired AP50 difference to the baseline of every seed, with its interval."""
    lines = ["| variant | model | seed | Δ AP50 | Δ AP@0.5:0.95 |", "|---|---|---|---|---|"]
    for variant, models in summary.items():
        for model, row in models.items():
            for seed, paired in row.get("paired", {}).items():
                cells = [variant, model, seed, *(difference_cell(paired, key) for key in ("map50", "map"))]
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def describe_set(name: str, scenes: int, objects: int, units: int, params: EvaluateParams) -> str:
    unit = (
        f"{units} cells of {params.bootstrap_cell} px of its scenes (each object and detection in the"
        " cell of its centre)"
        if params.bootstrap_cell
        else f"its {units} images"
    )
    title = "the held-out test split" if name == TEST_SET else f"extra set `{name}`"
    return (
        f"## {title}\n\n{scenes} scene(s), {objects} objects, each scored once on the whole scene"
        f" (sliced prediction, slices merged). Intervals: {params.bootstrap} bootstrap resamples of"
        f" {unit}, and of the seeds when there are several.\n\n"
    )


def render_markdown(sections: Sequence[tuple[str, str, str]]) -> str:
    """`sections`: (heading text, main table, per-seed table) per test set."""
    text = (
        "# Detector results on whole real scenes\n\n"
        "COCO AP on whole scenes: mean over seeds (± sample std with several seeds), with its 95 %"
        f" bootstrap interval in brackets. Δ: the paired difference to the `{BASELINE}` variant with"
        " the same model, with its interval; * marks a difference whose interval excludes zero."
        " tile AP50 is the earlier protocol (Ultralytics on overlapping test tiles, which counts an"
        " object in an overlap once per tile). Written by `genfusion report`.\n\n"
    )
    for heading, table, seeds in sections:
        text += heading + table + "\nPaired differences per seed:\n\n" + seeds + "\n"
    return text


def read_pr_curve(path: Path) -> tuple[list[float], list[float]]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return [float(r["recall"]) for r in rows], [float(r["precision"]) for r in rows]


def pr_figure(curves: dict[str, list[tuple[list[float], list[float]]]]):
    """Each variant's precision-recall curve at IoU 0.5, the mean over its seeds."""
    import numpy as np
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4.5), dpi=100)
    axes = figure.subplots()
    for variant, runs in curves.items():
        recall = runs[0][0]
        precision = np.mean([run[1] for run in runs], axis=0)
        axes.plot(recall, precision, label=f"{variant} ({len(runs)} seed{'s' * (len(runs) > 1)})")
    # Axes fitted to the curves: a weak detector's curves fill only a corner of the unit square.
    runs = [run for variant_runs in curves.values() for run in variant_runs]
    reach = max((r for run in runs for r, p in zip(*run, strict=True) if p > 0), default=0.0)
    top = max((p for run in runs for p in run[1]), default=0.0)
    axes.set(
        xlabel="recall",
        ylabel="precision",
        xlim=(0, min(1.0, 1.1 * reach) or 1.0),
        ylim=(0, min(1.0, 1.1 * top) or 1.0),
    )
    axes.set_title("Precision-recall at IoU 0.5 on the test scenes")
    axes.legend()
    figure.tight_layout()
    return figure


PixelBox = tuple[float, float, float, float]


def draw_boxes(image, boxes: Sequence[PixelBox], colour: str, width: int):
    """`image` with pixel boxes (x0, y0, x1, y1) drawn on it."""
    from PIL import ImageDraw

    draw = ImageDraw.Draw(image)
    for box in boxes:
        draw.rectangle(box, outline=colour, width=width)
    return image


def scene_previews(scene_set, entries: Sequence[dict], longest: int) -> dict[int, tuple]:
    """Each scene at most `longest` px a side (an orthomosaic is never read whole), with the
    scale from scene pixels to its pixels."""
    previews = {}
    for entry in entries:
        scene = open_scene(scene_set.image(entry), None)
        try:
            pixels = scene.preview(longest)
        finally:
            scene.close()
        scale = (pixels.shape[1] / scene.size[0], pixels.shape[0] / scene.size[1])
        previews[entry["id"]] = (pixels, scale)
    return previews


def detections_figure(scene_set, found: dict[str, list[dict]], params: Params, columns: int = 4):
    """A row per variant: its detections scoring at least report.conf (red) and the true boxes
    (yellow) on the test scenes."""
    from PIL import Image

    from genfusion.figures import grid

    cell = 400
    entries = scene_set.images[:columns]
    previews = scene_previews(scene_set, entries, cell)

    def boxes_by_image(records: Sequence[dict]) -> dict[int, list[PixelBox]]:
        """COCO boxes in the pixels of their scene's preview."""
        placed: dict[int, list[PixelBox]] = defaultdict(list)
        for record in records:
            if record["image_id"] in previews:
                x, y, w, h = record["bbox"]
                sx, sy = previews[record["image_id"]][1]
                placed[record["image_id"]].append((x * sx, y * sy, (x + w) * sx, (y + h) * sy))
        return placed

    truth = boxes_by_image(scene_set.ground_truth["annotations"])
    rows = []
    for name, detections in found.items():
        shown = boxes_by_image([d for d in detections if d["score"] >= params.report.conf])
        images = []
        for entry in entries:
            image = draw_boxes(Image.fromarray(previews[entry["id"]][0]), truth[entry["id"]], "yellow", 1)
            images.append(draw_boxes(image, shown[entry["id"]], "red", 2))
        found_count = sum(len(shown[e["id"]]) for e in entries)
        true_count = sum(len(truth[e["id"]]) for e in entries)
        rows.append((f"{name}: {found_count} found, {true_count} true", images))
    return grid(rows, len(entries), cell=cell)


def interval_table(
    ground_truth: dict,
    detections: dict[tuple[str, int], list[dict]],
    records: Sequence[dict],
    params: EvaluateParams,
) -> tuple[dict, int]:
    """The summary of `records` with bootstrap intervals from the detections of every (variant,
    seed) on one set of scenes, all resampled alike; and the number of resampled units."""
    table = summarise(records)
    seeds = sorted({seed for _, seed in detections})
    _, units = scoring.units_of(ground_truth["images"], params.bootstrap_cell)
    if params.bootstrap:
        draws = scoring.unit_draws(units, params.bootstrap, params.bootstrap_seed)
        samples = {
            key: scoring.bootstrap(scoring.match(ground_truth, found, params.bootstrap_cell), draws)
            for key, found in detections.items()
        }
        add_intervals(table, records, samples, seeds, params)
    return table, units


def score_set(
    test_set: str, scenes: Path, eval_dir: Path, predictions: Path, params: Params
) -> tuple[dict, tuple[str, str, str], dict[str, list[dict]]]:
    """One test set's summary with intervals, its report section, and each variant's detections
    of its first seed."""
    variants, seeds = params.train.rows, params.train.seeds
    records = load_evaluations(eval_dir, variants, seeds, test_set)
    scene_set = read_scene_set(scenes / test_set)
    detections = {
        (v, s): load_json(predictions / test_set / f"{v}-{s}.json", evaluation_stage(test_set, v, s))
        for v in variants
        for s in seeds
    }
    table, units = interval_table(scene_set.ground_truth, detections, records, params.evaluate)
    objects = len(scene_set.ground_truth["annotations"])
    heading = describe_set(test_set, len(scene_set.images), objects, units, params.evaluate)
    first_seed = {f"{v}-{seeds[0]}": detections[(v, seeds[0])] for v in variants}
    return table, (heading, markdown_table(table), per_seed_table(table)), first_seed


def main(
    params: Params,
    *,
    eval_dir: Path,
    pr_dir: Path,
    predictions: Path,
    scenes: Path,
    summary: Path,
    markdown: Path,
    figures: Path,
) -> None:
    variants, seeds = params.train.rows, params.train.seeds
    tables, sections = {}, []
    for test_set in [TEST_SET, *params.evaluate.extra_sets]:
        table, section, found = score_set(test_set, scenes, eval_dir, predictions, params)
        tables[test_set] = table
        sections.append(section)
        if test_set == TEST_SET:
            test_detections = found
    curves = {v: [read_pr_curve(pr_dir / f"{v}-{s}.csv") for s in seeds] for v in variants}
    fsio.write_png(figures / "pr_curves.png", pr_figure(curves))
    panels = {("test split" if name == TEST_SET else name): table for name, table in tables.items()}
    fsio.write_png(figures / "verdict.png", verdict_figure(verdict_rows(panels, BASELINE), BASELINE))
    test_scenes = read_scene_set(scenes / TEST_SET)
    fsio.write_png(figures / "detections.png", detections_figure(test_scenes, test_detections, params))
    fsio.write_json(summary, tables)
    fsio.write_text(markdown, render_markdown(sections))
