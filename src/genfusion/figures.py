"""Figures more than one command draws: a labelled grid of thumbnails (the gallery and the
report's detections), and AP50 against the number of synthetic images (the report and sweeps)."""

from __future__ import annotations

from collections.abc import Sequence
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
