"""The train stage for real (tiny settings): outputs, dvclive curves, resume after a kill."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from genfusion.formats import read_annotations
from genfusion.layout import Sources
from genfusion.params import load_params
from genfusion.stages.datasets import build_dataset
from genfusion.stages.seeds import run_seeds
from genfusion.stages.train import checkpoint_epoch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workspace(neon_seeds: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real dataset from the NEON seeds and tiny training params."""
    root = tmp_path_factory.mktemp("train")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"].update(epochs=6, imgsz=64, batch=4, nbs=4, workers=0, close_mosaic=0)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    loaded = load_params(root / "params.yaml")
    run_seeds(read_annotations(neon_seeds), loaded.seeds, loaded.classes, root / "data/real")
    folders = ("real", "generated", "prelabels", "annotations", "variations")
    sources = Sources(*(root / "data" / name for name in folders))
    build_dataset("real", sources, root / "data/datasets/real")
    return root


def train_command(root: Path) -> list[str]:
    cli = [sys.executable, "-c", "from genfusion.cli import main; main()"]
    return cli + ["train", "--data", "data/datasets/real", "--out", "models/real-0", "--live", "live/real-0"]


def epochs_logged(out: Path) -> list[int]:
    with (out / "results.csv").open() as f:
        return [int(float(row["epoch"])) for row in csv.DictReader(f, skipinitialspace=True)]


def test_killed_training_resumes_and_ends_like_a_full_run(workspace: Path) -> None:
    scratch = workspace / "models" / ".real-0.partial"
    process = subprocess.Popen(
        train_command(workspace),
        cwd=workspace,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not (scratch / "weights" / "last.pt").exists():
        assert process.poll() is None, "training ended before it could be interrupted"
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.05)
    # Kill at a moment when the checkpoint on disk is whole (an epoch takes well under a second
    # here, so a plain delay can land in the middle of the next save, and a truncated checkpoint
    # makes the stage start over instead of resuming). The moment may fall before the epoch's
    # dvclive callback: the resumed run must then fill in that point of the curves.
    while True:
        os.killpg(process.pid, signal.SIGSTOP)
        if checkpoint_epoch(scratch / "weights" / "last.pt") is not None:
            break
        os.killpg(process.pid, signal.SIGCONT)
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (workspace / "models" / "real-0").exists(), "an interrupted run must not look finished"
    done_before_kill = epochs_logged(scratch)
    assert 1 <= len(done_before_kill) < 6

    resumed = subprocess.run(train_command(workspace), cwd=workspace, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming the interrupted run" in resumed.stdout + resumed.stderr
    out = workspace / "models" / "real-0"
    assert (out / "weights" / "best.pt").is_file()
    assert not scratch.exists()
    # An epoch that was running at the kill is trained again, so it may be logged twice.
    assert sorted(set(epochs_logged(out))) == [1, 2, 3, 4, 5, 6]
    loss = (workspace / "live/real-0/plots/metrics/train/box_loss.tsv").read_text().splitlines()
    steps = [int(line.split("\t")[0]) for line in loss[1:]]
    assert sorted(set(steps)) == list(range(6)), "dvclive must continue the curves, not restart them"
