"""Scene scoring: COCO AP as COCOeval computes it, and bootstrap resamples of test-scene cells."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest

from genfusion import scoring


def random_scenes(seed: int, images: int = 3, classes: int = 2) -> tuple[dict, list[dict]]:
    """Scenes with boxes, and detections near (jittered) and far from them, with random scores."""
    rng = np.random.default_rng(seed)
    truth = {
        "images": [],
        "annotations": [],
        "categories": [{"id": c + 1, "name": f"c{c}"} for c in range(classes)],
    }
    detections = []
    for image_id in range(1, images + 1):
        truth["images"].append({"id": image_id, "file_name": f"{image_id}.png", "width": 400, "height": 300})
        for _ in range(rng.integers(5, 40)):
            x, y = rng.uniform(0, 360), rng.uniform(0, 260)
            w, h = rng.uniform(8, 40, size=2)
            category = int(rng.integers(1, classes + 1))
            truth["annotations"].append(
                {
                    "id": len(truth["annotations"]) + 1, "image_id": image_id, "category_id": category,
                    "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0,
                }
            )  # fmt: skip
            if rng.random() < 0.8:
                jitter = rng.normal(0, 4, size=4)
                box = [x + jitter[0], y + jitter[1], max(w + jitter[2], 2), max(h + jitter[3], 2)]
                detections.append(
                    {"image_id": image_id, "category_id": category, "bbox": box, "score": rng.random()}
                )
        for _ in range(rng.integers(0, 15)):  # false positives
            box = [rng.uniform(0, 360), rng.uniform(0, 260), *rng.uniform(8, 40, size=2)]
            category = int(rng.integers(1, classes + 1))
            detections.append(
                {"image_id": image_id, "category_id": category, "bbox": box, "score": rng.random()}
            )
    return truth, detections


def cocoeval_ap(truth: dict, detections: list[dict]) -> dict[str, float]:
    from pycocotools.cocoeval import COCOeval

    gt = scoring._coco(truth)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes([dict(d) for d in detections])
        evaluation = COCOeval(gt, dt, "bbox")
        evaluation.params.maxDets = [10_000]
        evaluation.params.areaRng = [[0, 1e12]]
        evaluation.params.areaRngLbl = ["all"]
        evaluation.evaluate()
        evaluation.accumulate()
    precision = evaluation.eval["precision"][:, :, :, 0, 0]  # (T, R, K)

    def mean(values: np.ndarray) -> float:
        return float(values[values > -1].mean())

    return {"map": mean(precision), "map50": mean(precision[0]), "map75": mean(precision[5])}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ap_equals_cocoevals_own_accumulation(seed: int) -> None:
    truth, detections = random_scenes(seed)
    metrics, curve = scoring.score(scoring.match(truth, detections, cell=100), count_conf=0.5)
    expected = cocoeval_ap(truth, detections)
    for key in ("map", "map50", "map75"):
        assert metrics[key] == pytest.approx(expected[key], abs=1e-12), key
    assert 0 < metrics["map50"] < 1
    assert curve.shape == (101,) and curve[0] >= curve[-1]


def test_precision_and_recall_count_detections_from_the_confidence() -> None:
    truth = {
        "images": [{"id": 1, "width": 100, "height": 100}],
        "categories": [{"id": 1, "name": "tree"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [50, 50, 10, 10], "area": 100, "iscrowd": 0},
        ],
    }
    detections = [
        {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9},  # hit
        {"image_id": 1, "category_id": 1, "bbox": [80, 80, 10, 10], "score": 0.8},  # miss
        {"image_id": 1, "category_id": 1, "bbox": [50, 50, 10, 10], "score": 0.1},  # hit, below the cut
    ]
    metrics, _ = scoring.score(scoring.match(truth, detections, cell=None), count_conf=0.5)
    assert metrics["precision"] == pytest.approx(0.5)
    assert metrics["recall"] == pytest.approx(0.5)


def test_objects_and_detections_belong_to_the_cell_of_their_centre() -> None:
    truth, detections = random_scenes(3, images=2)
    matches = scoring.match(truth, detections, cell=100)
    # 400 x 300 px images: 4 x 3 cells each.
    assert matches.units == 24
    first = truth["annotations"][0]
    x, y, w, h = first["bbox"]
    expected = min(int((y + h / 2) // 100), 2) * 4 + min(int((x + w / 2) // 100), 3)
    assert expected in matches.box_unit[: sum(a["image_id"] == 1 for a in truth["annotations"])]
    assert matches.unit.max() < 24 and matches.box_unit.max() < 24
    assert scoring.match(truth, detections, cell=None).units == 2


def test_every_unit_drawn_once_gives_the_point_estimate() -> None:
    truth, detections = random_scenes(4)
    matches = scoring.match(truth, detections, cell=100)
    point, _ = scoring.score(matches, count_conf=0.5)
    shuffled = np.random.default_rng(0).permutation(matches.units)[None, :]
    samples = scoring.bootstrap(matches, np.concatenate([np.arange(matches.units)[None, :], shuffled]))
    for key in ("map", "map50", "map75"):
        assert samples[key] == pytest.approx([point[key]] * 2, abs=1e-9), key


def test_bootstrap_intervals_hold_the_estimate_and_pair_detectors() -> None:
    truth, detections = random_scenes(5)
    matches = scoring.match(truth, detections, cell=100)
    worse = scoring.match(truth, [d | {"score": d["score"] * 0.5} for d in detections[::2]], cell=100)
    draws = scoring.unit_draws(matches.units, 300, seed=0)
    assert draws.shape == (300, matches.units)
    samples, other = scoring.bootstrap(matches, draws), scoring.bootstrap(worse, draws)
    low, high = scoring.interval(samples["map50"])
    point, _ = scoring.score(matches, count_conf=0.5)
    assert low < point["map50"] < high
    assert scoring.interval(samples["map50"] - samples["map50"]) == (0.0, 0.0)
    # Half the detections find fewer objects: paired, the whole interval of the difference is below 0.
    assert scoring.interval(other["map50"] - samples["map50"])[1] < 0
    # The same seed draws the same units (every detector of a test set is scored on them).
    assert (scoring.unit_draws(matches.units, 300, seed=0) == draws).all()


def test_no_detections_score_zero() -> None:
    truth, _ = random_scenes(6)
    matches = scoring.match(truth, [], cell=100)
    metrics, curve = scoring.score(matches, count_conf=0.5)
    assert metrics == {"map": 0.0, "map50": 0.0, "map75": 0.0, "precision": 0.0, "recall": 0.0}
    assert not curve.any()
    assert not scoring.bootstrap(matches, scoring.unit_draws(matches.units, 5, 0))["map50"].any()
