"""`dvc repro`, `dvc exp run`, metrics and plots on the tiny pipeline (tests/tiny_pipeline.py), run
once per test session; tests that change the project take a copy of their own."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest
import yaml
from project import commit, run
from tiny_pipeline import BUILT, VARIANTS, TinyRun, copy_of

from genfusion.scenes import ANNOTATIONS

pytestmark = pytest.mark.integration


def train_matrix(repo: Path) -> list[tuple[str, int]]:
    train = yaml.safe_load((repo / "params.yaml").read_text())["train"]
    return [(variant, seed) for variant in train["variants"] for seed in train["seeds"]]


def real_tiles_count(repo: Path) -> int:
    return json.loads((repo / "data/datasets/real/counts.json").read_text())["train_images"]


def test_repro_runs_the_whole_matrix_and_a_second_repro_is_a_no_op(tiny_run: TinyRun) -> None:
    repo = tiny_run.repo
    matrix = train_matrix(repo)
    seeds = sorted({seed for _, seed in matrix})
    assert [v for v, _ in matrix] == VARIANTS
    summary = json.loads((repo / "metrics/summary.json").read_text())
    table = (repo / "reports/summary.md").read_text()
    for variant in {v for v, _ in matrix}:
        runs = [
            json.loads((repo / f"metrics/eval/{variant}-{seed}.json").read_text())
            for v, seed in matrix
            if v == variant
        ]
        assert all({"map", "map50", "map75", "precision", "recall", "train_images"} <= set(r) for r in runs)
        counts = json.loads((repo / f"data/datasets/{variant}/counts.json").read_text())
        assert (
            runs[0]["train_images"]
            == counts["train_images"]
            == len(list((repo / f"data/datasets/{variant}/images/train").iterdir()))
        )
        row = summary["test"][variant]["yolov8n"]
        # The report's mean and sample std, computed by hand from the per-seed metrics files.
        values = [r["map50"] for r in runs]
        assert row["map50_mean"] == pytest.approx(sum(values) / len(values))
        mean = sum(values) / len(values)
        assert row["map50_std"] == pytest.approx(
            (sum((x - mean) ** 2 for x in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
        )
        assert row["map50_low"] <= row["map50_high"]
        if variant != "real":
            assert row["map50_delta_low"] <= row["map50_delta_high"]
            assert set(row["paired"]) == {str(seed) for seed in seeds}
        assert f"| {variant} | yolov8n | {len(runs)} | {counts['train_images']} |" in table
        assert (repo / f"metrics/pr/{variant}-0.csv").read_text().startswith("recall,precision\n")
        # Each object of the extra set is scored once, on its whole scene.
        extra = [json.loads((repo / f"metrics/eval/soap/{variant}-{s}.json").read_text()) for s in seeds]
        assert all(e["scenes"] == 1 and e["objects"] == 37 for e in extra)
        assert summary["soap"][variant]["yolov8n"]["map50_mean"] == pytest.approx(
            statistics.mean(e["map50"] for e in extra)
        )
    assert "extra set `soap`" in table
    # The two-phase row: composite's detector of each seed fine-tuned on the real train split,
    # scored on the same scenes (the test split and the extra set) beside the variants.
    for seed in seeds:
        two_phase = json.loads((repo / f"metrics/eval/composite-then-real-{seed}.json").read_text())
        assert two_phase["variant"] == "composite-then-real"
        assert two_phase["train_images"] == real_tiles_count(repo)
        assert (repo / f"metrics/eval/soap/composite-then-real-{seed}.json").is_file()
    assert list(summary["test"]) == [*dict.fromkeys(v for v, _ in matrix), "composite-then-real"]
    assert f"| composite-then-real | yolov8n | {len(seeds)} |" in table
    for variant, seed in matrix:  # every detector exported, its ONNX model scoring as it does
        check = json.loads((repo / f"metrics/export/{variant}-{seed}.json").read_text())
        assert check["parity"] and check["map50_difference"] <= check["tolerance"]
        assert (repo / f"models/onnx/{variant}-{seed}.onnx").stat().st_size > 100_000
        exported = onnx.load(repo / f"models/onnx/{variant}-{seed}.onnx")
        assert "date" not in {p.key for p in exported.metadata_props}  # same weights, same file
    scene = json.loads((repo / "data/scenes/test/annotations.json").read_text())
    assert [image["file_name"] for image in scene["images"]] == ["images/OSBS_029.png"]
    assert len(scene["annotations"]) == 61  # each tree once, although the test tiles overlap
    real_tiles = json.loads((repo / "metrics/import.json").read_text())["tiles"]["train"]
    assert json.loads((repo / "data/datasets/real/counts.json").read_text())["train_images"] == real_tiles
    for figure in ("verdict", "pr_curves", "detections", "gallery"):
        assert (repo / f"reports/{figure}.png").read_bytes().startswith(b"\x89PNG"), figure
    assert list((repo / "metrics/train/real-0/plots/metrics").rglob("*.tsv"))

    again = run(repo, "dvc", "repro")
    assert "Running stage" not in again
    assert "up to date" in run(repo, "dvc", "status")


def test_a_second_export_of_the_same_weights_is_the_same_file(tiny_run: TinyRun, tmp_path: Path) -> None:
    """Determinism of the export stage: onnxslim's shape annotations vary from export to export
    of the same weights, so a clean clone's `dvc repro` would change the ONNX models' hashes."""
    from genfusion.stages.export import export_onnx

    repo = tiny_run.repo
    variant, seed = train_matrix(repo)[0]
    imgsz = yaml.safe_load((repo / "params.yaml").read_text())["train"]["imgsz"]
    for attempt in range(2):
        again = export_onnx(repo / f"models/detectors/{variant}-{seed}/weights/best.pt", imgsz, tmp_path)
        assert again.read_bytes() == (repo / f"models/onnx/{variant}-{seed}.onnx").read_bytes(), attempt


def test_every_built_dataset_passes_ultralytics_check_of_a_training_set(tiny_run: TinyRun) -> None:
    """Every dataset the tiny pipeline builds, most of which it trains nothing on
    (tests/tiny_pipeline.py): every train image and its label file pass the check Ultralytics makes
    of each pair before it trains (verify_image_label, run here without the label cache it would
    write into the outputs)."""
    from ultralytics.data.utils import img2label_paths, verify_image_label

    repo = tiny_run.repo
    for variant in [VARIANTS[0], *BUILT]:
        dataset = repo / f"data/datasets/{variant}/dataset.yaml"
        spec = yaml.safe_load(dataset.read_text())
        counts = json.loads((dataset.parent / "counts.json").read_text())
        images = sorted(str(p) for p in (dataset.parent / spec["train"]).iterdir())
        assert len(images) == counts["train_images"] > 0, variant
        boxes = 0
        for image, label in zip(images, img2label_paths(images), strict=True):
            checked = verify_image_label((image, label, "", False, len(spec["names"]), 0, 0, False))
            _, labels, _, _, _, _, found, _, corrupt, message = checked
            assert (found, corrupt) == (1, 0), f"{variant}: {image}: {message}"
            boxes += len(labels)
        assert boxes == counts["train_boxes"], variant


def test_a_change_of_seeds_adds_their_stages_and_nothing_else(tiny_project: Path) -> None:
    """The seed matrix, checked with `dvc status` (which runs nothing): a new seed adds a
    detector of every variant and two-phase row, its evaluations and exports, and the report."""
    repo = tiny_project
    params = yaml.safe_load((repo / "params.yaml").read_text())
    variants, first = params["train"]["variants"], params["train"]["init_from"]
    new = max(params["train"]["seeds"]) + 1
    params["train"]["seeds"].append(new)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = set(json.loads(run(repo, "dvc", "status", "--json")))
    rows = [f"{v}-{new}" for v in variants]
    two_phase = [f"{v}-{new}" for v in first]
    assert changed == {
        *(f"{stage}@{row}" for stage in ("train", "evaluate", "validate", "export") for row in rows),
        *(f"evaluate_extra@{row}-soap" for row in rows),
        *(f"{stage}@{row}" for stage in ("train_two_phase", "evaluate_two_phase") for row in two_phase),
        *(f"evaluate_extra_two_phase@{row}-soap" for row in two_phase),
        "report",
    }
    assert not (repo / f"models/detectors/real-{new}").exists()


def test_the_fold_of_the_default_test_scene_reuses_the_default_run(tiny_project: Path) -> None:
    """`make study` holds out each scene in turn; the default split's test split is one whole
    scene, and holding that scene out gives the same split, so its fold reruns the seeds stage
    (a param changed) and nothing after it: every detector of the default run is reused."""
    repo = tiny_project
    scenes = json.loads((repo / "data/scenes/test" / ANNOTATIONS).read_text())["images"]
    assert len(scenes) == 1
    held_out = Path(scenes[0]["file_name"]).stem
    out = run(repo, "dvc", "exp", "run", "-S", f"seeds.test_scene={held_out}", "report")
    assert re.findall(r"Running stage '([^']+)'", out) == ["seeds"], out


def test_a_model_trained_before_comes_back_from_the_run_cache(tiny_project: Path) -> None:
    """Params changed and changed back: the fine-tuned generator and the detector trained with the
    first params come back from DVC's run cache, not trained again. A queued experiment, a fold or
    a tuning trial starts in a fresh workspace, where the run cache is all that can spare them."""
    repo = tiny_project
    targets = ("finetune@canopy", "train@real-0")
    params = (repo / "params.yaml").read_text()
    other = yaml.safe_load(params)
    other["finetune"]["steps"] += 1
    other["train"]["epochs"] += 1
    (repo / "params.yaml").write_text(yaml.safe_dump(other, sort_keys=False))
    first = run(repo, "dvc", "repro", *targets)
    assert all(f"Running stage '{target}'" in first for target in targets), first
    (repo / "params.yaml").write_text(params)
    back = run(repo, "dvc", "repro", *targets)
    for target in targets:
        assert f"Stage '{target}' is cached - skipping run" in back, back
    assert "Running stage" not in back, back
    assert "up to date" in run(repo, "dvc", "status", *targets)


def test_a_changed_param_touches_only_the_stages_that_read_it(tiny_project: Path) -> None:
    repo = tiny_project
    params = (repo / "params.yaml").read_text()
    (repo / "params.yaml").write_text(params.replace("  epochs: 1\n", "  epochs: 2\n"))
    changed = set(json.loads(run(repo, "dvc", "status", "--json")))
    two_phase = {f"train_two_phase@composite-{s}" for s in {s for _, s in train_matrix(repo)}}
    assert changed == {f"train@{v}-{s}" for v, s in train_matrix(repo)} | two_phase
    (repo / "params.yaml").write_text(params)
    assert "up to date" in run(repo, "dvc", "status")

    # An experiment that changes a key only the report reads: the report alone reruns.
    out = run(repo, "dvc", "exp", "run", "-S", "evaluate.bootstrap=100", "-n", "fewer-resamples")
    assert "Running stage 'report'" in out
    assert out.count("Running stage") == 1, out
    assert "up to date" in run(repo, "dvc", "status")
    table = json.loads(run(repo, "dvc", "exp", "show", "--json"))
    text = json.dumps(table)
    assert "fewer-resamples" in text and "map50_delta_low" in text


def queued_params(shown: object) -> list[dict]:
    """The params.yaml values of every queued experiment in `dvc exp show --json` output."""
    found = []
    if isinstance(shown, dict):
        if (shown.get("executor") or {}).get("state") == "queued":
            found.append(shown["revs"][0]["data"]["params"]["params.yaml"]["data"])
        for value in shown.values():
            found += queued_params(value)
    elif isinstance(shown, list):
        for value in shown:
            found += queued_params(value)
    return found


def test_a_profile_sweep_queues_one_experiment_per_value(tiny_project: Path) -> None:
    repo = tiny_project
    run(repo, "genfusion", "exp", "profiles/variations-80-20-100.yaml", "--queue")
    try:
        queued = queued_params(json.loads(run(repo, "dvc", "exp", "show", "--json")))
        assert sorted(p["variations"]["per_image"] for p in queued) == [0, 2, 10]
        assert all(p["seeds"]["split"] == {"train": 0.4, "val": 0.1, "test": 0.5} for p in queued)
        assert all(p["seeds"]["split_by"] == "tile" for p in queued)
    finally:
        run(repo, "dvc", "queue", "remove", "--all")


def test_metrics_and_plots_compare_across_branches(tiny_project: Path) -> None:
    repo = tiny_project
    run(repo, "git", "checkout", "-q", "-b", "resamples")
    run(repo, "dvc", "exp", "run", "-S", "evaluate.bootstrap=100")
    commit(repo, "fewer resamples")
    diff = json.loads(run(repo, "dvc", "metrics", "diff", "main", "--all", "--json"))
    assert {"map", "map50", "map75"} <= set(diff["metrics/eval/real-0.json"])
    tiles = diff["metrics/import.json"]["tiles.train"]
    assert tiles["new"] == tiles["old"]
    plots = json.loads(run(repo, "dvc", "plots", "diff", "main", "--json"))
    assert not plots.get("errors"), plots["errors"]
    names = set(plots["data"])
    assert {"metrics/pr/real-0.csv", "reports/pr_curves.png", "reports/detections.png"} <= names
    # Both runs' verdicts, side by side.
    assert {entry["revisions"][0] for entry in plots["data"]["reports/verdict.png"]} == {"main", "workspace"}
    assert any(name.startswith("metrics/train/real-0/plots/") for name in names)
    assert any(name.startswith("metrics/finetune/canopy/plots/") for name in names)
    run(repo, "dvc", "plots", "diff", "main", "-o", "plots-out")
    assert "metrics/pr/real-0.csv" in (repo / "plots-out" / "index.html").read_text()


# In a process of its own (FiftyOne's database is chosen per process): each false-positive view's
# label fields, then the image paths once the dataset has followed the project to argv[1].
FIFTYONE_STATE = """
import json, sys
from pathlib import Path
from genfusion.integrations.fiftyone import connect, follow_project_move, use_database

root = Path(sys.argv[1])
use_database(root / ".fiftyone")
connect()
import fiftyone as fo

print("datasets:", fo.list_datasets())
dataset = fo.load_dataset("genfusion")
labels = ("ground_truth", "auto_labels", "people_labels")
views = {}
for name in dataset.list_saved_views():
    if name.startswith("false-positives-"):
        fields = dataset.load_saved_view(name).get_field_schema()
        views[name] = sorted(f for f in fields if f.startswith("pred_") or f in labels)
moved = follow_project_move(dataset, root)
print(json.dumps({"views": views, "moved": moved, "files": dataset.values("filepath")}))
"""


def copy_once_database_stopped(tiny_run: TinyRun, dest: Path) -> Path:
    """A copy of the tiny project taken once the MongoDB that its inspect stage started has shut
    down (it empties its lock file then): a copy of a live database can lack what it wrote last."""
    lock = tiny_run.repo / ".fiftyone/mongod.lock"
    deadline = time.monotonic() + 120
    while lock.is_file() and lock.stat().st_size and time.monotonic() < deadline:
        time.sleep(1)
    assert not (lock.is_file() and lock.stat().st_size), "the tiny run's FiftyOne database is still running"
    return copy_of(tiny_run, dest)


@pytest.mark.integration
def test_a_copied_projects_app_shows_its_own_images_and_each_detectors_mistakes_alone(
    tiny_run: TinyRun, tmp_path: Path
) -> None:
    """The FiftyOne database moves with a copied project, its image paths do not: they follow it
    (as `inspect app` and the next build do). A false-positive view shows its detector's boxes and
    the ground truth, not the other detectors' boxes over them."""
    tiny_project = copy_once_database_stopped(tiny_run, tmp_path / "moved")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIFTYONE_")}
    done = subprocess.run(
        [sys.executable, "-c", FIFTYONE_STATE, str(tiny_project)],
        cwd=tiny_project,
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stdout[-1000:] + done.stderr[-3000:]
    state = json.loads(done.stdout.strip().splitlines()[-1])
    params = yaml.safe_load((tiny_project / "params.yaml").read_text())["train"]
    rows = [*params["variants"], *(f"{v}-then-real" for v in params["init_from"])]
    detectors = [f"pred_{row.replace('-', '_')}_{seed}" for row in rows for seed in params["seeds"]]
    assert state["views"] == {
        f"false-positives-{d.removeprefix('pred_')}": ["ground_truth", d] for d in detectors
    }
    assert state["moved"] == len(state["files"]) > 0
    root = tiny_project.resolve()
    assert all(Path(f).is_relative_to(root) and Path(f).is_file() for f in state["files"])


def test_the_verdict_figure_draws_the_summarys_differences_and_intervals(tiny_run: TinyRun) -> None:
    """reports/verdict.png's rows: every variant but real on every test set, for both measures,
    each with the paired difference, interval and per-seed differences of metrics/summary.json,
    drawn where they are."""
    from genfusion.figures import VERDICT_MEASURES, verdict_figure, verdict_rows

    summary = json.loads((tiny_run.repo / "metrics/summary.json").read_text())
    panels = {("test split" if name == "test" else name): table for name, table in summary.items()}
    rows = verdict_rows(panels)
    measures = [key for key, _ in VERDICT_MEASURES]
    assert [(r.panel, r.label, r.measure) for r in rows] == [
        (panel, variant, key)
        for panel, table in panels.items()
        for variant in table
        if variant != "real"
        for key in measures
    ]
    assert len(panels) == 2 and len(rows) == 2 * 2 * (
        len(VARIANTS) - 1 + 1
    )  # the variants and the two-phase row
    for row in rows:
        (cell,) = panels[row.panel][row.label].values()
        key = row.measure
        assert (row.delta, row.low, row.high) == (
            cell[f"{key}_delta"],
            cell[f"{key}_delta_low"],
            cell[f"{key}_delta_high"],
        )
        assert row.seeds == tuple(seed[f"{key}_delta"] for seed in cell["paired"].values())
    figure = verdict_figure(rows)
    for axes, (panel, key) in zip(figure.axes, [(p, k) for p in panels for k in measures], strict=True):
        drawn = [(c.lines[0].get_xdata()[0], c.lines[2][0].get_segments()[0]) for c in axes.containers]
        mine = [r for r in rows if (r.panel, r.measure) == (panel, key)]
        assert [x for x, _ in drawn] == [r.delta for r in mine]
        ends = [end for _, segment in drawn for end in (segment[0][0], segment[1][0])]
        assert ends == pytest.approx([end for r in mine for end in (r.low, r.high)])
        starred = [label.get_text() for label in axes.get_yticklabels() if label.get_text().endswith(" *")]
        assert starred == [f"{r.label} *" for r in mine if r.excludes_zero]
