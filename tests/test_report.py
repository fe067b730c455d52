from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from genfusion.errors import GenfusionError
from genfusion.stages.report import load_evaluations, markdown_table, summarise


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
    assert "| real | yolov8n | 1 | 20 | 0.300 | 0.600 | 0.200 |" in lines
    assert "| mixed | yolov8n | 1 | 20 | 0.500 (+0.200) | 0.900 (+0.300) | 0.500 (+0.300) |" in lines


def test_missing_evaluation_names_the_file_and_the_stage(tmp_path: Path) -> None:
    (tmp_path / "real-0.json").write_text(json.dumps(record("real", 0, 0.3, 0.6, 0.2)))
    assert len(load_evaluations(tmp_path, ["real"], [0])) == 1
    with pytest.raises(GenfusionError, match=r"real-1\.json: missing; run `dvc repro evaluate@real-1`"):
        load_evaluations(tmp_path, ["real"], [0, 1])


def test_pr_figure_draws_the_seed_mean_of_each_variant() -> None:
    from genfusion.stages.report import pr_figure

    recall = [0.0, 0.5, 1.0]
    figure = pr_figure(
        {"real": [(recall, [1.0, 0.5, 0.0]), (recall, [0.8, 0.3, 0.0])], "mixed": [(recall, [1, 1, 0])]}
    )
    lines = figure.axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["real (2 seeds)", "mixed (1 seed)"]
    assert list(lines[0].get_ydata()) == pytest.approx([0.9, 0.4, 0.0])


def test_sweep_points_come_from_every_experiments_summary() -> None:
    from genfusion.commands.experiments import experiment_summaries
    from genfusion.figures import synthetic_figure, synthetic_points

    def summary(n: int, ap: float) -> dict:
        return summarise(
            [record("real", 0, 0.1, 0.2, 0.1), record("mixed", 0, 0.1, ap, 0.1) | {"synthetic_images": n}]
        )

    def metrics(n: int, ap: float) -> dict:
        return {"metrics": {"metrics/summary.json": {"data": summary(n, ap)}}}

    experiment = {"rev": "e1", "name": "ratio-2", "data": metrics(40, 0.35)}
    shown = [
        {"rev": "workspace", "data": metrics(20, 0.3)},
        {"rev": "abc", "data": {"metrics": {}}, "experiments": [{"revs": [experiment]}]},
    ]
    points = sorted({p for s in experiment_summaries(shown) for p in synthetic_points(s)})
    assert points == [
        ("mixed (yolov8n)", 20, 0.3, 0.0),
        ("mixed (yolov8n)", 40, 0.35, 0.0),
        ("real (yolov8n)", 0, 0.2, 0.0),
    ]
    bars = synthetic_figure(points).axes[0].containers
    assert [bar.get_label() for bar in bars] == ["mixed (yolov8n)", "real (yolov8n)"]
    assert [list(bar.lines[0].get_xdata()) for bar in bars] == [[20, 40], [0]]
