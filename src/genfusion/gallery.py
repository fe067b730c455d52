"""`gallery` stage: one picture of what the default run makes, for a person to look at.

A row of real train tiles, a row of their first img2img variation each (same column as
its source), then a row of generated images per subject.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from genfusion import fsio

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


def gallery_rows(real: Path, generated: Path, variations: Path, columns: int) -> list:
    tiles = sorted((real / "images" / "train").glob("*.png"))[:columns]
    firsts = [variations / "images" / f"{tile.stem}_v0.png" for tile in tiles]
    rows = [
        ("real train tiles", tiles),
        (
            "variations (img2img of the tile above, its boxes carried over)",
            [p if p.exists() else None for p in firsts],
        ),
    ]
    for folder in sorted(p for p in generated.iterdir() if p.is_dir()):
        rows.append((f"generated: {folder.name}", sorted((folder / "images").glob("*.png"))[:columns]))
    return rows


def main(real: Path, generated: Path, variations: Path, out: Path, columns: int = 8) -> None:
    fsio.write_png(out, grid(gallery_rows(real, generated, variations, columns), columns))
