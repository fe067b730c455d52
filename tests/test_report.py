from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
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


def test_markdown_table_shows_every_row_the_delta_and_its_interval() -> None:
    table = summarise([record("real", 0, 0.3, 0.6, 0.2), record("mixed", 0, 0.5, 0.9, 0.5)])
    lines = markdown_table(table).splitlines()
    assert lines[0] == (
        "| variant | model | seeds | train images | AP@0.5:0.95 | AP50 | AP75"
        " | Δ AP@0.5:0.95 | Δ AP50 | Δ AP75 |"
    )
    assert "| real | yolov8n | 1 | 20 | 0.300 | 0.600 | 0.200 |  |  |  |" in lines
    assert "| mixed | yolov8n | 1 | 20 | 0.500 | 0.900 | 0.500 | +0.200 | +0.300 | +0.300 |" in lines
    table["mixed"]["yolov8n"] |= {
        "map50_low": 0.8,
        "map50_high": 0.95,
        "map50_delta_low": 0.1,
        "map50_delta_high": 0.4,
    }
    table["mixed"]["yolov8n"] |= {"map_delta_low": -0.1, "map_delta_high": 0.4}
    row = markdown_table(table).splitlines()[3]
    assert "| 0.900 [0.800, 0.950] |" in row
    assert "| +0.300 [+0.100, +0.400] * |" in row  # the interval excludes zero
    assert "| +0.200 [-0.100, +0.400] |" in row


def test_intervals_pool_seeds_and_pair_each_seed_with_the_baseline() -> None:
    from genfusion.params import EvaluateParams
    from genfusion.stages.report import add_intervals

    records = [
        record(v, s, 0.1, ap, 0.1)
        for v, s, ap in [("real", 0, 0.5), ("real", 1, 0.6), ("mixed", 0, 0.7), ("mixed", 1, 0.7)]
    ]
    rng = np.random.default_rng(0)
    noise = {
        s: rng.normal(0, 0.05, 2000) for s in (0, 1)
    }  # the test units' resampling, shared by a seed's detectors
    samples = {
        (r["variant"], r["seed"]): {
            k: r[k] + noise[r["seed"]] + (k == "map50") * rng.normal(0, 0.001, 2000)
            for k in ("map", "map50", "map75")
        }
        for r in records
    }
    table = summarise(records)
    add_intervals(table, records, samples, [0, 1], EvaluateParams())
    mixed = table["mixed"]["yolov8n"]
    assert mixed["map50_delta"] == pytest.approx(0.15)
    # Paired: a seed's shared noise cancels, so its difference is known far better than either AP.
    seed_0 = mixed["paired"]["0"]
    assert (
        seed_0["map50_delta_high"] - seed_0["map50_delta_low"]
        < (mixed["map50_high"] - mixed["map50_low"]) / 5
    )
    assert mixed["map50_delta_low"] > 0
    assert mixed["paired"]["0"]["map50_delta"] == pytest.approx(0.2)
    assert mixed["paired"]["1"]["map50_delta"] == pytest.approx(0.1)
    assert mixed["paired"]["1"]["map50_delta_low"] < 0.1 < mixed["paired"]["1"]["map50_delta_high"]
    # Pooled over resampled seeds, the interval spans the two seeds' differences.
    assert mixed["map50_delta_low"] < 0.12 and mixed["map50_delta_high"] > 0.18
    assert "paired" not in table["real"]["yolov8n"]


def test_missing_evaluation_names_the_file_and_the_stage(tmp_path: Path) -> None:
    (tmp_path / "real-0.json").write_text(json.dumps(record("real", 0, 0.3, 0.6, 0.2)))
    assert len(load_evaluations(tmp_path, ["real"], [0])) == 1
    with pytest.raises(GenfusionError, match=r"real-1\.json: missing; run `dvc repro evaluate@real-1`"):
        load_evaluations(tmp_path, ["real"], [0, 1])
    with pytest.raises(
        GenfusionError, match=r"site2/real-0\.json: missing; run `dvc repro evaluate_extra@real-0-site2`"
    ):
        load_evaluations(tmp_path, ["real"], [0], "site2")


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
        return {"metrics": {"metrics/summary.json": {"data": {"test": summary(n, ap)}}}}

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


def test_detections_figure_draws_a_large_scene_from_a_preview(tmp_path: Path) -> None:
    """A test scene kept as a tiled GeoTIFF is drawn from a decimated read, the boxes scaled to it."""
    from PIL import Image
    from test_seeds import write_ortho

    from genfusion.boxes import Box
    from genfusion.params import load_params
    from genfusion.scenes import Scene, read_scene_set, write_scene_set
    from genfusion.stages.report import detections_figure, scene_previews

    ortho = tmp_path / "ortho.tif"
    write_ortho(ortho, 3000, 2000)
    box = Box("tree", 1500, 1000, 1800, 1300)
    write_scene_set(
        tmp_path / "scenes", [Scene("ortho", ortho, (3000, 2000), (box,))], ["tree"], "test", 10**9
    )
    scene_set = read_scene_set(tmp_path / "scenes")
    ((pixels, scale),) = scene_previews(scene_set, scene_set.images, 400).values()
    assert pixels.shape == (267, 400, 3) and scale == pytest.approx((400 / 3000, 267 / 2000))
    full = np.asarray(Image.open(ortho).convert("RGB").resize((400, 267), Image.Resampling.BOX), dtype=float)
    assert np.abs(pixels - full).mean() < 2  # GDAL's average against Pillow's box filter

    found = {"real (yolov8n)": [{"image_id": 1, "bbox": [1500, 1000, 300, 300], "score": 0.9}]}
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    figure = np.asarray(detections_figure(scene_set, found, params))
    assert figure.shape[1] == 400
    red = (figure[..., 0] > 200) & (figure[..., 1] < 60) & (figure[..., 2] < 60)
    rows, columns = np.nonzero(red)
    # The box spans 300 of 3000 px across: about 40 of the preview's 400 (drawn 2 px wide).
    assert 195 <= columns.min() <= 205 and 235 <= columns.max() <= 245


def test_verdict_rows_follow_the_summary_and_star_only_intervals_that_exclude_zero() -> None:
    from genfusion.figures import verdict_figure, verdict_rows

    def cell(delta: float, low: float | None, high: float | None, seeds: list[float]) -> dict:
        paired = {str(s): {"map50_delta": d, "map_delta": d / 2} for s, d in enumerate(seeds)}
        interval = {} if low is None else {"map50_delta_low": low, "map50_delta_high": high}
        return {"yolov8n": {"map50_delta": delta, "map_delta": delta / 2, "paired": paired, **interval}}

    summary = {
        "real": {"yolov8n": {"map50_delta": 0.0, "map_delta": 0.0}},
        "worse": cell(-0.04, -0.06, -0.02, [-0.05, -0.03]),
        "unclear": cell(0.01, -0.02, 0.05, [0.03, -0.01]),
        "unbootstrapped": cell(0.02, None, None, [0.02]),
    }
    rows = verdict_rows({"test split": summary})
    ap50 = [r for r in rows if r.measure == "map50"]
    assert [(r.label, r.delta, r.low, r.high, r.seeds, r.excludes_zero) for r in ap50] == [
        ("worse", -0.04, -0.06, -0.02, (-0.05, -0.03), True),
        ("unclear", 0.01, -0.02, 0.05, (0.03, -0.01), False),
        ("unbootstrapped", 0.02, None, None, (0.02,), False),
    ]
    assert [r.label for r in rows if r.measure == "map"] == ["worse", "unclear", "unbootstrapped"]
    labels = [t.get_text() for t in verdict_figure(rows).axes[0].get_yticklabels()]
    assert labels == ["worse *", "unclear", "unbootstrapped"]
    # Only the baseline trained (a cross-scene fold of `real` alone): a figure that says so.
    (said,) = verdict_figure(verdict_rows({"test split": {"real": summary["real"]}})).texts
    assert "nothing to compare" in said.get_text()


def test_precision_recall_axes_fit_the_curves() -> None:
    from genfusion.stages.report import pr_figure

    recall = [i / 100 for i in range(101)]
    precision = [0.5 if r <= 0.2 else 0.0 for r in recall]
    axes = pr_figure({"real": [(recall, precision)]}).axes[0]
    assert axes.get_xlim() == pytest.approx((0, 0.22)) and axes.get_ylim() == pytest.approx((0, 0.55))
