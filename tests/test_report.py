from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from genfusion.errors import GenfusionError
from genfusion.report import load_evaluations, markdown_table, summarise


def record(variant: str, seed: int, map_: float, map50: float, map75: float) -> dict:
    return {
        "variant": variant,
        "seed": seed,
        "model": "yolov8n",
        "map": map_,
        "map50": map50,
        "map75": map75,
        "train_images": 20,
        "synthetic_images": 0 if variant == "real" else 20,
    }


def test_mean_std_and_delta_match_a_hand_computation() -> None:
    runs = [
        record("real", 0, 0.30, 0.60, 0.20),
        record("real", 1, 0.40, 0.70, 0.40),
        record("real", 2, 0.35, 0.80, 0.30),
        record("mixed", 0, 0.50, 0.90, 0.50),
    ]
    row = summarise(runs)["real"]["yolov8n"]
    assert row["seeds"] == 3
    assert row["map50_mean"] == pytest.approx(0.70)
    # Sample std of 0.6, 0.7, 0.8: sqrt(((-0.1)^2 + 0 + 0.1^2) / 2) = 0.1
    assert row["map50_std"] == pytest.approx(0.1)
    assert row["map_std"] == pytest.approx(math.sqrt((0.05**2 + 0.05**2) / 2))
    mixed = summarise(runs)["mixed"]["yolov8n"]
    assert mixed["map50_std"] == 0.0  # a single seed has no spread
    assert mixed["map50_delta"] == pytest.approx(0.90 - 0.70)
    assert row["map50_delta"] == pytest.approx(0.0)


def test_markdown_table_shows_every_row_and_the_delta() -> None:
    table = markdown_table(summarise([record("real", 0, 0.3, 0.6, 0.2), record("mixed", 0, 0.5, 0.9, 0.5)]))
    lines = table.splitlines()
    assert lines[0] == "| variant | model | seeds | train images | AP@0.5:0.95 | AP50 | AP75 |"
    assert "| real | yolov8n | 1 | 20 | 0.300 ± 0.000 | 0.600 ± 0.000 | 0.200 ± 0.000 |" in lines
    assert (
        "| mixed | yolov8n | 1 | 20 | 0.500 ± 0.000 (+0.200) | 0.900 ± 0.000 (+0.300)"
        " | 0.500 ± 0.000 (+0.300) |" in lines
    )


def test_missing_evaluation_names_the_file_and_the_stage(tmp_path: Path) -> None:
    (tmp_path / "real-0.json").write_text(json.dumps(record("real", 0, 0.3, 0.6, 0.2)))
    assert len(load_evaluations(tmp_path, ["real"], [0])) == 1
    with pytest.raises(GenfusionError, match=r"real-1\.json: missing; run `dvc repro evaluate@real-1`"):
        load_evaluations(tmp_path, ["real"], [0, 1])
