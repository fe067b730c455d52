"""`gallery` stage: one picture of what the default run makes, for a person to look at.

A row of real train tiles, a row of their first img2img variation each (same column as
its source), then a row of generated images per subject.
"""

from __future__ import annotations

from pathlib import Path

from genfusion import fsio, layout
from genfusion.figures import grid


def gallery_rows(real: Path, generated: Path, variations: Path, columns: int) -> list:
    tiles = layout.image_files(real, "train")[:columns]
    firsts = [layout.images_dir(variations) / f"{tile.stem}_v0.png" for tile in tiles]
    rows = [
        ("real train tiles", tiles),
        (
            "variations (img2img of the tile above, its boxes carried over)",
            [p if p.exists() else None for p in firsts],
        ),
    ]
    for folder in sorted(p for p in generated.iterdir() if p.is_dir()):
        rows.append((f"generated: {folder.name}", layout.image_files(folder)[:columns]))
    return rows


def main(*, real: Path, generated: Path, variations: Path, out: Path, columns: int = 8) -> None:
    fsio.write_png(out, grid(gallery_rows(real, generated, variations, columns), columns))
