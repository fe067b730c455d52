"""Experiments side by side: `dvc queue start -j 2` runs two queued experiments of the tiny
pipeline at once, one thread each (`threads=1`), each retraining a detector, and each gives the
metrics it gives alone on one thread. A queued experiment runs in a copy of the project of its own
(`.dvc/tmp/exps`), and what two could share is kept per project: Ultralytics' settings (`.yolo`),
dvclive's folders (under `metrics/`) and scratch names (beside each output). FiftyOne's database,
also per project, is tested with two projects at once in tests/test_inspection.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from project import run

from genfusion.commands.experiments import FINISHED, experiments

pytestmark = pytest.mark.integration

DVC = str(Path(sys.executable).parent / "dvc")

# Two experiments, each with its learning rate: a YOLO training logged by dvclive.
EXPERIMENTS = {"lr-high": "train.lr0=0.02", "lr-low": "train.lr0=0.005"}
STAGE = "train@real-0"
TRAINED = "metrics/train/real-0/metrics.json"


def shown(repo: Path) -> object | None:
    """`dvc exp show --json` output; None when it fails, as it can for a moment while an
    experiment finishes ("Empty git repo")."""
    done = subprocess.run([DVC, "exp", "show", "--json"], cwd=repo, capture_output=True, text=True)
    return None if done.returncode else json.loads(done.stdout)


def by_name(shown: object, states: tuple = FINISHED) -> dict[str, dict]:
    """The experiments in `shown` whose executor state is one of `states`, by name."""
    return {rev["name"]: rev for rev in experiments(shown, states)}


def trained(repo: Path, experiment: dict) -> str:
    """The hash of dvclive's training metrics as the experiment's dvc.lock records them (they are
    a cached output, not a `dvc exp show` metric)."""
    lock = yaml.safe_load(run(repo, "git", "show", f"{experiment['rev']}:dvc.lock"))
    (out,) = [out for out in lock["stages"][STAGE]["outs"] if out["path"] == TRAINED]
    return out["md5"]


def overrides(setting: str) -> list[str]:
    return ["-S", "threads=1", "-S", setting]


def test_two_experiments_at_once_give_the_metrics_each_gives_alone(tiny_project: Path) -> None:
    repo = tiny_project
    for name, setting in EXPERIMENTS.items():
        run(repo, "dvc", "exp", "run", "--queue", "-n", name, *overrides(setting), STAGE)
    # The workers it starts keep its output open until the queue is empty: not captured, so that
    # this returns as they start.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    start = [DVC, "queue", "start", "-j", "2"]
    subprocess.run(start, cwd=repo, env=os.environ | {"PATH": path}, stdout=subprocess.DEVNULL, check=True)
    most_running, deadline = 0, time.monotonic() + 600
    while True:
        now = shown(repo)
        if now is not None:
            most_running = max(most_running, len(by_name(now, ("running",)).keys() & EXPERIMENTS.keys()))
            if EXPERIMENTS.keys() <= by_name(now, (*FINISHED, "failed")).keys():
                break
        assert time.monotonic() < deadline, f"the queue has not finished: {now}"
        time.sleep(2)
    assert most_running == 2, "the two experiments never ran at once"
    assert not by_name(now, ("failed",)), run(repo, "dvc", "queue", "status")
    finished = by_name(now)

    # The learning rate changes the detector: equal metrics below are not copies of one run.
    assert trained(repo, finished["lr-high"]) != trained(repo, finished["lr-low"])
    for name, setting in EXPERIMENTS.items():
        # Alone, in the workspace; forced, so DVC's run cache cannot hand back the queued run's outputs.
        out = run(repo, "dvc", "exp", "run", "-f", "-s", "-n", f"{name}-alone", *overrides(setting), STAGE)
        assert out.count("Running stage") == 1, out
        alone = by_name(shown(repo))[f"{name}-alone"]
        assert trained(repo, alone) == trained(repo, finished[name]), name
