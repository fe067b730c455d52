from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from genfusion.figures import CELL, LABEL
from genfusion.stages.gallery import main


def tile(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), colour).save(path)


def test_variations_sit_under_their_source_and_each_subject_gets_a_row(tmp_path: Path) -> None:
    tile(tmp_path / "real/images/train/a.png", (255, 0, 0))
    tile(tmp_path / "real/images/train/b.png", (0, 255, 0))
    tile(tmp_path / "variations/images/b_v0.png", (0, 0, 255))  # a has no variation
    tile(tmp_path / "generated/canopy/images/canopy_00000.png", (9, 9, 9))
    tile(tmp_path / "generated/dead/images/dead_00000.png", (200, 200, 200))
    out = tmp_path / "reports/gallery.png"
    main(
        real=tmp_path / "real",
        generated=tmp_path / "generated",
        variations=tmp_path / "variations",
        out=out,
        columns=2,
    )
    pixels = np.asarray(Image.open(out))
    assert pixels.shape == (4 * (LABEL + CELL), 2 * CELL, 3)

    def cell(row: int, column: int) -> tuple:
        return tuple(pixels[row * (LABEL + CELL) + LABEL + CELL // 2, column * CELL + CELL // 2])

    assert cell(0, 0) == (255, 0, 0) and cell(0, 1) == (0, 255, 0)
    assert cell(1, 0) == (255, 255, 255) and cell(1, 1) == (0, 0, 255)
    assert cell(2, 0) == (9, 9, 9) and cell(3, 0) == (200, 200, 200)
