"""`report` stage: Genfusion Table-1 style summary over variants, models and seeds, and figures.

Rows are (variant, model); columns AP@0.5:0.95, AP50 and AP75 as mean +- sample std
over seeds (for a single seed, std is 0 in the JSON and left out of the table), and each
mean's difference to the `real` variant with the same model. Figures: every variant's
precision-recall curve in one chart, AP50 against the number of synthetic train images, and
each variant's detections on real test tiles.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from genfusion import fsio, layout
from genfusion.errors import GenfusionError
from genfusion.figures import synthetic_figure, synthetic_points

if TYPE_CHECKING:
    from genfusion.params import Params

BOX_METRICS = (("map", "AP@0.5:0.95"), ("map50", "AP50"), ("map75", "AP75"))
# Segmentation models (task: segment) are also scored on their masks.
MASK_METRICS = (("mask_map", "mask AP@0.5:0.95"), ("mask_map50", "mask AP50"), ("mask_map75", "mask AP75"))


def metrics_of(records: Sequence[dict]) -> tuple[tuple[str, str], ...]:
    """The report's columns: box AP, and mask AP when every evaluation has it."""
    masks = bool(records) and all(MASK_METRICS[0][0] in r for r in records)
    return BOX_METRICS + MASK_METRICS * masks


BASELINE = "real"


def load_evaluations(eval_dir: Path, variants: Sequence[str], seeds: Sequence[int]) -> list[dict]:
    records = []
    for variant in variants:
        for seed in seeds:
            path = eval_dir / f"{variant}-{seed}.json"
            try:
                records.append(json.loads(path.read_text()))
            except FileNotFoundError as exc:
                raise GenfusionError(f"{path}: missing; run `dvc repro evaluate@{variant}-{seed}`") from exc
            except json.JSONDecodeError as exc:
                raise GenfusionError(f"{path}: not valid JSON ({exc})") from exc
    return records


def summarise(records: Sequence[dict]) -> dict[str, dict[str, dict]]:
    """{variant: {model: row}} with mean, std and the difference to the baseline variant."""
    metrics = metrics_of(records)
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for record in records:
        groups[(record["variant"], record["model"])].append(record)
    summary: dict[str, dict[str, dict]] = defaultdict(dict)
    for (variant, model), runs in groups.items():
        row: dict = {
            "seeds": len(runs),
            "train_images": runs[0]["train_images"],
            "synthetic_images": runs[0]["synthetic_images"],
        }
        for key, _ in metrics:
            values = [r[key] for r in runs]
            row[f"{key}_mean"] = statistics.fmean(values)
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary[variant][model] = row
    for models in summary.values():
        for model, row in models.items():
            base = summary.get(BASELINE, {}).get(model)
            for key, _ in metrics:
                row[f"{key}_delta"] = row[f"{key}_mean"] - base[f"{key}_mean"] if base else None
    return dict(summary)


def markdown_table(summary: dict[str, dict[str, dict]]) -> str:
    rows = [row for models in summary.values() for row in models.values()]
    metrics = [(key, label) for key, label in BOX_METRICS + MASK_METRICS if f"{key}_mean" in rows[0]]
    header = ["variant", "model", "seeds", "train images", *(label for _, label in metrics)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant, models in summary.items():
        for model, row in models.items():
            cells = [variant, model, str(row["seeds"]), str(row["train_images"])]
            for key, _ in metrics:
                cell = f"{row[f'{key}_mean']:.3f}"
                if row["seeds"] > 1:  # one seed has no spread to show
                    cell += f" ± {row[f'{key}_std']:.3f}"
                delta = row[f"{key}_delta"]
                if variant != BASELINE and delta is not None:
                    cell += f" ({delta:+.3f})"
                cells.append(cell)
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_markdown(summary: dict[str, dict[str, dict]]) -> str:
    return (
        "# Detector results on the real test split\n\n"
        "Mean ± sample standard deviation over seeds; in brackets, the difference to the"
        f" `{BASELINE}` variant with the same model. Written by `genfusion report`.\n\n"
        + markdown_table(summary)
    )


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
    axes.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1))
    axes.set_title("Precision-recall at IoU 0.5 on the real test split")
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


def true_boxes(label: Path, names: list[str], size: tuple[int, int]) -> list[PixelBox]:
    from genfusion.formats.yolo import read_label_file

    boxes = read_label_file(label, names, size)
    return [(b.x0, b.y0, b.x1, b.y1) for b in boxes]


def detections_figure(detectors: dict[str, Path], real: Path, params, columns: int = 4):
    """A row per variant: its detector's boxes (red) and the true boxes (yellow) on test tiles."""
    from PIL import Image

    from genfusion.figures import grid
    from genfusion.integrations.ultralytics import load_yolo

    tiles = layout.image_files(real, "test")[:columns]
    truth = {}
    for tile in tiles:
        with Image.open(tile) as image:
            label = layout.label_file(real, tile.stem, "test")
            truth[tile] = true_boxes(label, params.classes, image.size)
    rows = []
    for variant, weights in detectors.items():
        model = load_yolo(weights)
        results = model.predict(
            [str(t) for t in tiles], imgsz=params.train.imgsz, conf=params.report.conf,
            device=params.train.device, verbose=False,
        )  # fmt: skip
        images, found = [], 0
        for tile, result in zip(tiles, results, strict=True):
            boxes = result.boxes.xyxy.tolist()
            found += len(boxes)
            image = draw_boxes(Image.open(tile).convert("RGB"), truth[tile], "yellow", 1)
            images.append(draw_boxes(image, boxes, "red", 2))
        true_count = sum(len(b) for b in truth.values())
        rows.append((f"{variant} ({weights.parent.parent.name}): {found} found, {true_count} true", images))
    return grid(rows, columns, cell=256)


def main(
    params: Params,
    *,
    eval_dir: Path,
    pr_dir: Path,
    detectors: Path,
    real: Path,
    summary: Path,
    markdown: Path,
    figures: Path,
) -> None:
    variants, seeds = params.train.variants, params.train.seeds
    table = summarise(load_evaluations(eval_dir, variants, seeds))
    curves = {v: [read_pr_curve(pr_dir / f"{v}-{s}.csv") for s in seeds] for v in variants}
    weights = {v: layout.detector_weights(detectors, f"{v}-{seeds[0]}") for v in variants}
    fsio.write_png(figures / "pr_curves.png", pr_figure(curves))
    fsio.write_png(figures / "ap_vs_synthetic.png", synthetic_figure(synthetic_points(table)))
    fsio.write_png(figures / "detections.png", detections_figure(weights, real, params))
    fsio.write_json(summary, table)
    fsio.write_text(markdown, render_markdown(table))
