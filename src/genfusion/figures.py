"""Figures more than one command draws: a labelled grid of thumbnails (the gallery and the
report's detections), the verdict as a forest plot (the report and the cross-scene report), and
AP50 against the number of synthetic images (sweeps)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

CELL = 128
LABEL = 16


def grid(
    rows: Sequence[tuple[str, Sequence[Image.Image | Path | None]]], columns: int, cell: int = CELL
) -> Image.Image:
    """Labelled rows of square thumbnails (images or image files), `columns` wide; None leaves a
    cell empty."""
    canvas = Image.new("RGB", (columns * cell, len(rows) * (LABEL + cell)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, images) in enumerate(rows):
        top = r * (LABEL + cell)
        draw.text((4, top + 2), label, fill="black")
        for c, image in enumerate(images[:columns]):
            if isinstance(image, Path):
                with Image.open(image) as opened:
                    image = opened.convert("RGB")
            if image is not None:
                canvas.paste(image.resize((cell, cell), Image.Resampling.LANCZOS), (c * cell, top + LABEL))
    return canvas


def synthetic_points(summary: dict[str, dict[str, dict]]) -> list[tuple[str, int, float, float]]:
    """(variant and model, synthetic train images, AP50 mean, AP50 std) of each report row."""
    return [
        (f"{variant} ({model})", row["synthetic_images"], row["map50_mean"], row["map50_std"])
        for variant, models in summary.items()
        for model, row in models.items()
    ]


def synthetic_figure(points: Sequence[tuple[str, int, float, float]]):
    """AP50 (mean +- std over seeds) against the number of synthetic train images, a line per
    variant and model: one point per row of this run, or per experiment of a sweep."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4.5), dpi=100)
    axes = figure.subplots()
    for label in dict.fromkeys(point[0] for point in points):
        mine = sorted(point[1:] for point in points if point[0] == label)
        xs, ys, errors = zip(*mine, strict=True)
        axes.errorbar(xs, ys, yerr=errors, fmt="o-", capsize=4, label=label)
    axes.set(xlabel="synthetic train images", ylabel="AP50 on the real test split")
    axes.set_title("AP50 against the number of synthetic images")
    axes.legend()
    figure.tight_layout()
    return figure


# The verdict's measures: (summary key, axis label).
VERDICT_MEASURES = (("map50", "Δ AP50"), ("map", "Δ AP@0.5:0.95"))


@dataclass(frozen=True)
class VerdictRow:
    """One row of the verdict: a variant's paired difference to the baseline on one test set."""

    panel: str  # the test set (or the pooled folds)
    label: str  # the variant, and its model when the table has several
    measure: str  # a key of VERDICT_MEASURES
    delta: float  # the difference of the means over seeds
    low: float | None  # its 95 % interval (None without bootstrap)
    high: float | None
    seeds: tuple[float, ...]  # each seed's own difference

    @property
    def excludes_zero(self) -> bool:
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)


def verdict_rows(panels: Mapping[str, dict], baseline: str = "real") -> list[VerdictRow]:
    """The verdict's rows from report summaries ({panel: summary}, as metrics/summary.json holds
    one per test set): every variant but the baseline, for each measure, in the summary's order."""
    rows = []
    for panel, summary in panels.items():
        several = len({model for models in summary.values() for model in models}) > 1
        for variant, models in summary.items():
            if variant == baseline:
                continue
            for model, row in models.items():
                label = f"{variant} ({model})" if several else variant
                for key, _ in VERDICT_MEASURES:
                    if row.get(f"{key}_delta") is None:
                        continue
                    seeds = tuple(paired[f"{key}_delta"] for paired in row.get("paired", {}).values())
                    low, high = row.get(f"{key}_delta_low"), row.get(f"{key}_delta_high")
                    rows.append(VerdictRow(panel, label, key, row[f"{key}_delta"], low, high, seeds))
    return rows


def verdict_figure(rows: Sequence[VerdictRow], baseline: str = "real"):
    """A forest plot: a panel per test set and measure, a row per variant with its paired
    difference to the baseline and 95 % interval, each seed's own difference as a small grey
    point, a line at zero; a row whose interval excludes zero is filled and starred."""
    from matplotlib.figure import Figure

    panels = list(dict.fromkeys(row.panel for row in rows))
    labels = list(dict.fromkeys(row.label for row in rows))
    if not rows:  # only the baseline was trained: the figure, a declared output, says so
        figure = Figure(figsize=(6, 1.5), dpi=100)
        figure.text(0.5, 0.5, f"No variant but {baseline} was trained: nothing to compare.", ha="center")
        return figure
    figure = Figure(figsize=(10, 1.2 + 0.45 * len(labels) * len(panels) + 0.6 * len(panels)), dpi=100)
    grid_axes = figure.subplots(len(panels), len(VERDICT_MEASURES), squeeze=False)
    for p, panel in enumerate(panels):
        for m, (key, title) in enumerate(VERDICT_MEASURES):
            axes = grid_axes[p][m]
            axes.axvline(0, color="black", linewidth=0.8)
            mine = {row.label: row for row in rows if row.panel == panel and row.measure == key}
            for y, label in enumerate(labels):
                row = mine.get(label)
                if row is None:
                    continue
                axes.scatter(row.seeds, [y] * len(row.seeds), s=10, color="grey", zorder=2)
                error = None
                if row.low is not None and row.high is not None:
                    error = [[row.delta - row.low], [row.high - row.delta]]
                axes.errorbar(
                    [row.delta], [y], xerr=error, fmt="o", capsize=3, color="tab:blue", zorder=3,
                    markerfacecolor="tab:blue" if row.excludes_zero else "white",
                )  # fmt: skip
            axes.set_yticks(range(len(labels)))
            axes.set_yticklabels(
                [f"{label} *" if label in mine and mine[label].excludes_zero else label for label in labels]
            )
            axes.invert_yaxis()
            axes.set_title(panel, fontsize=9)
            axes.set_xlabel(f"{title} to {baseline}")
            axes.grid(axis="x", alpha=0.3)
    figure.suptitle(
        f"Each variant against {baseline}: paired difference, 95 % interval (* excludes zero), grey: a seed"
    )
    figure.tight_layout(rect=(0, 0, 1, 0.98))
    return figure
