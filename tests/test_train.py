"""The train stage for real (tiny settings): outputs, dvclive curves, exact resume after a kill."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from genfusion.formats import read_annotations
from genfusion.integrations.ultralytics import configure_offline, continue_shuffling
from genfusion.layout import Sources
from genfusion.params import load_params
from genfusion.stages.datasets import build_dataset
from genfusion.stages.seeds import run_seeds
from genfusion.stages.train import checkpoint_epoch

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 6
# Mosaic closes, and Ultralytics resets the train loader, at epoch EPOCHS - CLOSE_MOSAIC (0-based).
CLOSE_MOSAIC = 2


@pytest.fixture(scope="module")
def workspace(neon_seeds: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real dataset from the NEON seeds and tiny training params."""
    root = tmp_path_factory.mktemp("train")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"].update(epochs=EPOCHS, imgsz=64, batch=4, nbs=4, workers=0, close_mosaic=CLOSE_MOSAIC)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    loaded = load_params(root / "params.yaml")
    run_seeds(read_annotations(neon_seeds), loaded.seeds, loaded.classes, root / "data/real")
    folders = ("real", "generated", "prelabels", "annotations", "variations")
    sources = Sources(*(root / "data" / name for name in folders))
    build_dataset("real", sources, root / "data/datasets/real")
    return root


def train_command(root: Path, name: str = "real-0") -> list[str]:
    cli = [sys.executable, "-c", "from genfusion.cli import main; main()"]
    paths = ["--data", "data/datasets/real", "--out", f"models/{name}", "--live", f"live/{name}"]
    return [*cli, "train", *paths]


def results(out: Path) -> list[dict[str, str]]:
    """results.csv's rows, less the wall-clock time."""
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f, skipinitialspace=True))
    return [{k: v for k, v in row.items() if k != "time"} for row in rows]


def epochs_logged(out: Path) -> list[int]:
    return [int(float(row["epoch"])) for row in results(out)]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["model"].state_dict()


@pytest.fixture(scope="module")
def uninterrupted(workspace: Path) -> Path:
    """The same training as the killed one, run to its end in one go."""
    run = subprocess.run(train_command(workspace, "full-0"), cwd=workspace, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return workspace / "models" / "full-0"


@pytest.mark.integration
def test_a_run_killed_after_its_last_epoch_trains_again(workspace: Path, uninterrupted: Path) -> None:
    """A kill after the last epoch, before the scratch folder became the output, leaves a finished
    (stripped) checkpoint, which Ultralytics cannot resume: it would train anew from the finished
    weights (and fails its check on an unstripped last-epoch one). The stage trains again from the
    start instead, and ends as the uninterrupted run did."""
    assert checkpoint_epoch(uninterrupted / "weights" / "last.pt") == -1  # stripped at the end
    scratch = workspace / "models" / ".finished-0.partial"
    shutil.copytree(uninterrupted, scratch)
    run = subprocess.run(
        train_command(workspace, "finished-0"), cwd=workspace, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert "killed after its last epoch; training again" in run.stdout + run.stderr
    assert results(workspace / "models" / "finished-0") == results(uninterrupted)
    assert not scratch.exists()


@pytest.mark.integration
def test_killed_training_resumes_and_ends_like_a_full_run(workspace: Path, uninterrupted: Path) -> None:
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
    assert 1 <= len(done_before_kill) < EPOCHS

    resumed = subprocess.run(train_command(workspace), cwd=workspace, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming the interrupted run" in resumed.stdout + resumed.stderr
    out = workspace / "models" / "real-0"
    assert (out / "weights" / "best.pt").is_file()
    assert not scratch.exists()
    assert not (out / "resume-state").exists(), "the resume state is scratch, not output"
    # An epoch that was running at the kill is trained again, so it may be logged twice.
    assert sorted(set(epochs_logged(out))) == list(range(1, EPOCHS + 1))
    loss = (workspace / "live/real-0/plots/metrics/train/box_loss.tsv").read_text().splitlines()
    steps = [int(line.split("\t")[0]) for line in loss[1:]]
    assert sorted(set(steps)) == list(range(EPOCHS)), "dvclive must continue the curves, not restart them"

    # CPU training with deterministic=True is bitwise reproducible: the resumed run must end
    # where the uninterrupted one did, with the same losses and metrics at every epoch.
    full = {row["epoch"]: row for row in results(uninterrupted)}
    for row in results(out):
        assert row == full[row["epoch"]], f"epoch {row['epoch']} (killed after {done_before_kill[-1]})"
    for name in ("last.pt", "best.pt"):
        ours, theirs = weights(out / "weights" / name), weights(uninterrupted / "weights" / name)
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), f"{name} differs from the full run's"


def batches_per_epoch(loader, epochs: range) -> list[list[list[int]]]:
    """The batches a loader gives in each epoch, iterated as Ultralytics' training loop does: one
    iterator throughout, reset when mosaic closes, at the run's first epoch from
    EPOCHS - CLOSE_MOSAIC on (so a run resumed later resets at its first epoch)."""
    mosaic_closed = False
    batches = []
    for epoch in epochs:
        if not mosaic_closed and epoch >= EPOCHS - CLOSE_MOSAIC:
            mosaic_closed = True
            loader.reset()
        batches.append([batch.tolist() for batch in loader])
    return batches


@pytest.mark.parametrize(
    ("images", "batch", "drop_last"),
    [(20, 4, False), (10, 4, False), (10, 4, True)],
    ids=["last-batch-full", "last-batch-partial", "last-batch-dropped"],
)
@pytest.mark.parametrize(
    "resume_epoch", [1, EPOCHS - CLOSE_MOSAIC, EPOCHS - 1], ids=["before-close", "at-close", "after-close"]
)
def test_resumed_loader_shuffles_like_the_interrupted_one(
    images: int, batch: int, drop_last: bool, resume_epoch: int
) -> None:
    """Every case of the loader's state at a resume: the last batch of an epoch full or not, the
    resume before mosaic closes (and resets the loader), at that epoch or after it."""
    configure_offline()
    from ultralytics.data.build import build_dataloader

    def loader():
        with torch.random.fork_rng():
            torch.manual_seed(1)  # as Ultralytics seeds every run, and its loaders from that seed
            return build_dataloader(list(range(images)), batch, workers=0, shuffle=True, drop_last=drop_last)

    full = batches_per_epoch(loader(), range(EPOCHS))
    killed = loader()
    batches_per_epoch(killed, range(resume_epoch))
    resumed = loader()
    args = SimpleNamespace(close_mosaic=CLOSE_MOSAIC)
    trainer = SimpleNamespace(train_loader=resumed, epoch=resume_epoch, epochs=EPOCHS, args=args)
    continue_shuffling(trainer, killed.sampler.generator.get_state())
    assert batches_per_epoch(resumed, range(resume_epoch, EPOCHS)) == full[resume_epoch:]
