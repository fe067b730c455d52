"""`dvc repro`, `dvc exp run`, metrics and plots on a copy of the project in a fresh git repo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration

# Pipeline outputs a developer's working tree may hold; a clean clone has none of them.
OUTPUTS = ("data/real/", "data/datasets/", "models/", "metrics/", "reports/")
TINY = {
    "train": {"epochs": 1, "imgsz": 64, "batch": 4, "workers": 0},
    "diffusion": {"resolution": 32, "pretrain_steps": 2, "pretrain_vae_steps": 2},
    "finetune": {"steps": 2, "num_class_images": 2},
    "generate": {"n": 2, "steps": 2},
    "variations": {"per_image": 1, "steps": 2, "strength": 0.5},
}


def run(repo: Path, *args: str) -> str:
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def project_copy(dest: Path) -> Path:
    """The project's files as a clean clone would have them (no outputs, no cache)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in listed:
        if (ROOT / name).is_file() and not name.startswith(OUTPUTS) and name != "dvc.lock":
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = project_copy(tmp_path_factory.mktemp("project"))
    run(repo, "git", "init", "-q", "-b", "main")
    run(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A")
    run(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    run(repo, "dvc", "pull", "-q", "data/seeds/neon-trees.dvc")
    return repo


def commit(repo: Path, message: str) -> None:
    run(repo, "git", "add", "-A")
    run(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message)


def test_repro_writes_metrics_and_a_second_repro_is_a_no_op(repo: Path) -> None:
    run(repo, "dvc", "repro")
    evaluation = json.loads((repo / "metrics/eval/real-0.json").read_text())
    assert {"map", "map50", "map75", "precision", "recall", "train_images"} <= set(evaluation)
    assert (
        evaluation["train_images"] == json.loads((repo / "metrics/import.json").read_text())["tiles"]["train"]
    )
    summary = json.loads((repo / "metrics/summary.json").read_text())
    assert summary["real"]["yolov8n"]["map50_mean"] == evaluation["map50"]
    assert "| real | yolov8n | 1 |" in (repo / "reports/summary.md").read_text()
    assert (repo / "metrics/pr/real-0.csv").read_text().startswith("recall,precision\n")
    assert list((repo / "metrics/train/real-0/plots/metrics").rglob("*.tsv"))

    again = run(repo, "dvc", "repro")
    assert "Running stage" not in again
    assert "up to date" in run(repo, "dvc", "status")
    commit(repo, "baseline")


def test_exp_run_reruns_only_what_depends_on_the_changed_param(repo: Path) -> None:
    out = run(repo, "dvc", "exp", "run", "-S", "train.epochs=2", "-n", "two-epochs")
    assert "Running stage 'train@real-0'" in out
    assert "Running stage 'evaluate@real-0'" in out
    for untouched in ("seeds", "base_model", "finetune@canopy", "generate@canopy", "variations"):
        assert f"Running stage '{untouched}'" not in out
    table = json.loads(run(repo, "dvc", "exp", "show", "--json"))
    text = json.dumps(table)
    assert "two-epochs" in text and "map50" in text


def test_metrics_and_plots_compare_across_branches(repo: Path) -> None:
    run(repo, "git", "checkout", "-q", "-b", "more-epochs")
    run(repo, "dvc", "exp", "apply", "two-epochs")
    commit(repo, "two epochs")
    diff = json.loads(run(repo, "dvc", "metrics", "diff", "main", "--all", "--json"))
    assert {"map", "map50", "map75"} <= set(diff["metrics/eval/real-0.json"])
    tiles = diff["metrics/import.json"]["tiles.train"]
    assert tiles["new"] == tiles["old"]
    run(repo, "dvc", "plots", "diff", "main", "-o", "plots-out")
    html = (repo / "plots-out" / "index.html").read_text()
    assert "metrics/pr" in html or "Precision-recall" in html
