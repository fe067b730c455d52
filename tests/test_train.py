"""The train stage for real (tiny settings): outputs, dvclive curves, exact resume after a kill,
pretrained weights (where they must live, that training starts from them, that DVC retrains on new
ones)."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import killed_genfusion
import numpy as np
import pytest
import torch
import yaml
from project import commit, project_repo
from project import run as repo_run

from genfusion.formats import read_annotations
from genfusion.integrations.ultralytics import configure_offline, continue_shuffling
from genfusion.layout import Sources
from genfusion.params import check_pretrained_weights, load_params
from genfusion.stages.datasets import build_dataset
from genfusion.stages.seeds import run_seeds
from genfusion.stages.train import checkpoint_epoch, request_fingerprint

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 6
# Mosaic closes, and Ultralytics resets the train loader, at epoch EPOCHS - CLOSE_MOSAIC (0-based).
CLOSE_MOSAIC = 2


@pytest.fixture(scope="module")
def workspace(neon_seeds: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real dataset from the NEON seeds and tiny training params."""
    root = tmp_path_factory.mktemp("train")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    # Mosaic on (the default is off), so that the runs below are killed around its closing.
    params["train"].update(
        epochs=EPOCHS, imgsz=64, batch=4, nbs=4, workers=0, mosaic=1.0, close_mosaic=CLOSE_MOSAIC
    )
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    loaded = load_params(root / "params.yaml")
    run_seeds(read_annotations(neon_seeds), loaded.seeds, loaded.classes, root / "data/real")
    build_dataset("real", Sources(real=root / "data/real"), root / "data/datasets/real")
    return root


def train_command(
    root: Path, name: str = "real-0", *, seed: int = 0, kill_at: tuple[str, int] | None = None
) -> list[str]:
    """`genfusion train` into models/<name> from `seed`, or one that kills itself at (callback
    event, epoch)."""
    if kill_at is None:
        cli = [sys.executable, "-c", "from genfusion.cli import main; main()"]
    else:
        cli = killed_genfusion.command("callback", *kill_at)
    paths = ["--data", "data/datasets/real", "--out", f"models/{name}", "--live", f"live/{name}"]
    return [*cli, "train", *paths, "--seed", str(seed)]


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
def uninterrupted(workspace: Path, train_seed: int) -> Path:
    """The same training as the killed one, run to its end in one go."""
    run = subprocess.run(
        train_command(workspace, "full-0", seed=train_seed), cwd=workspace, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    return workspace / "models" / "full-0"


@pytest.mark.integration
def test_a_run_killed_after_its_last_epoch_trains_again(
    workspace: Path, uninterrupted: Path, train_seed: int
) -> None:
    """A kill after the last epoch, before the scratch folder became the output, leaves a finished
    (stripped) checkpoint, which Ultralytics cannot resume: it would train anew from the finished
    weights (and fails its check on an unstripped last-epoch one). The stage trains again from the
    start instead, and ends as the uninterrupted run did."""
    assert checkpoint_epoch(uninterrupted / "weights" / "last.pt") == -1  # stripped at the end
    scratch = workspace / "models" / ".finished-0.partial"
    shutil.copytree(uninterrupted, scratch)
    run = subprocess.run(
        train_command(workspace, "finished-0", seed=train_seed), cwd=workspace, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert "killed after its last epoch; training again" in run.stdout + run.stderr
    assert results(workspace / "models" / "finished-0") == results(uninterrupted)
    assert not scratch.exists()


def curve_steps(live: Path) -> list[int]:
    """The steps of the train box-loss curve dvclive wrote in `live`."""
    lines = (live / "plots/metrics/train/box_loss.tsv").read_text().splitlines()
    return [int(line.split("\t")[0]) for line in lines[1:]]


# Where a kill leaves the scratch folder: (callback event, 0-based epoch) of the kill, the epochs in
# results.csv and the checkpoint's epoch then, and the curve steps dvclive had written (None: no curve).
KILLS = {
    # After the first checkpoint, before dvclive wrote any curve (seen in CI on another machine).
    "before-the-first-curve": (("on_fit_epoch_end", 0), [1], 0, None),
    # In the first batch of the epoch after mosaic closed: that epoch is trained again on resume.
    "mid-epoch-after-mosaic-closed": (
        ("on_train_batch_end", EPOCHS - CLOSE_MOSAIC),
        [1, 2, 3, 4],
        3,
        [0, 1, 2, 3],
    ),
}


@pytest.mark.integration
@pytest.mark.parametrize("kill", KILLS, ids=list(KILLS))
def test_killed_training_resumes_and_ends_like_a_full_run(
    workspace: Path, uninterrupted: Path, train_seed: int, kill: str
) -> None:
    kill_at, logged, checkpoint, steps = KILLS[kill]
    name = f"real-{kill}"
    scratch = workspace / "models" / f".{name}.partial"
    killed = subprocess.run(
        train_command(workspace, name, seed=train_seed, kill_at=kill_at), cwd=workspace, capture_output=True
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    assert not (workspace / "models" / name).exists(), "an interrupted run must not look finished"
    assert epochs_logged(scratch) == logged
    assert checkpoint_epoch(scratch / "weights" / "last.pt") == checkpoint
    if steps is None:
        assert not (scratch / "live/plots/metrics/train/box_loss.tsv").exists()
    else:
        assert curve_steps(scratch / "live") == steps
        # A kill in dvclive's own writes leaves its summary truncated to nothing and a curve's last
        # line cut short (both seen in CI; dvclive could not resume from them).
        (scratch / "live" / "metrics.json").write_text("")
        with (scratch / "live/plots/metrics/train/box_loss.tsv").open("a") as curve:
            curve.write("7\t0.5")

    resumed = subprocess.run(
        train_command(workspace, name, seed=train_seed), cwd=workspace, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming the interrupted run" in resumed.stdout + resumed.stderr
    out = workspace / "models" / name
    assert (out / "weights" / "best.pt").is_file()
    assert not scratch.exists()
    assert not (out / "resume-state").exists(), "the resume state is scratch, not output"
    # An epoch that was running at the kill is trained again, so it may be logged twice.
    assert sorted(set(epochs_logged(out))) == list(range(1, EPOCHS + 1))
    assert curve_steps(workspace / "live" / name) == list(range(EPOCHS)), (
        "the curves hold each epoch once, rebuilt up to the checkpoint"
    )

    # CPU training with deterministic=True is bitwise reproducible: the resumed run must end
    # where the uninterrupted one did, with the same losses and metrics at every epoch.
    full = {row["epoch"]: row for row in results(uninterrupted)}
    for row in results(out):
        assert row == full[row["epoch"]], f"epoch {row['epoch']}"
    for file in ("last.pt", "best.pt"):
        ours, theirs = weights(out / "weights" / file), weights(uninterrupted / "weights" / file)
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), f"{file} differs from the full run's"


@pytest.mark.integration
def test_the_same_training_in_another_clone_writes_the_same_files(
    workspace: Path, uninterrupted: Path, train_seed: int, tmp_path: Path
) -> None:
    """Ultralytics writes the date, git details, wall-clock times and absolute paths into a run;
    the stage leaves them out, so the same request gives the same files (and DVC hashes) in
    any folder."""
    clone = tmp_path / "clone"
    shutil.copytree(workspace / "data", clone / "data", symlinks=True)
    shutil.copyfile(workspace / "params.yaml", clone / "params.yaml")
    run = subprocess.run(
        train_command(clone, "full-0", seed=train_seed), cwd=clone, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    again = clone / "models" / "full-0"
    files = sorted(p.relative_to(uninterrupted) for p in uninterrupted.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for name in files:
        assert (again / name).read_bytes() == (uninterrupted / name).read_bytes(), name
    checkpoint = torch.load(again / "weights" / "best.pt", map_location="cpu", weights_only=False)
    assert not {"date", "git"} & set(checkpoint) and "time" not in checkpoint["train_results"]
    assert checkpoint["train_args"]["data"] == "data/datasets/real/dataset.yaml"


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


def train_params(root: Path, name: str, **train) -> Path:
    """The workspace's params with some train.* keys changed, as `root/name`."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"].update(train)
    (root / name).write_text(yaml.safe_dump(params))
    return root / name


def train(root: Path, name: str, *options: str, seed: int = 0) -> None:
    done = subprocess.run(
        [*train_command(root, name, seed=seed), *options], cwd=root, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def parameters(path: Path) -> list[torch.Tensor]:
    model = torch.load(path, map_location="cpu", weights_only=False)["model"]
    return [p.detach().float() for p in model.parameters()]


def distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return sum(((x - y) ** 2).sum() for x, y in zip(a, b, strict=True)).sqrt().item()


@pytest.fixture(scope="module")
def pretrained(workspace: Path, train_seed: int) -> Path:
    """Weights trained on the workspace's dataset, where train.model may name them:
    models/pretrained/start.pt. From the seed after the tests' (`--train-seed`), so that they
    grew from another random model than the tests' runs from scratch start with."""
    train(workspace, "pretrain", seed=train_seed + 1)
    path = workspace / "models/pretrained/start.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(workspace / "models/pretrain/weights/last.pt", path)
    return path


@pytest.mark.integration
def test_training_starts_from_pretrained_weights(workspace: Path, pretrained: Path, train_seed: int) -> None:
    starts = {"from-pt-0": "models/pretrained/start.pt", "scratch-0": "yolov8n.yaml"}
    for name, model in starts.items():
        params = train_params(workspace, f"params-{name}.yaml", model=model, epochs=2)
        train(workspace, name, "--params", params.name, seed=train_seed)
    # The weights were loaded, not just the architecture: two epochs move the pretrained weights
    # little, and the run from scratch ends far from them. (Which of the two has the lower loss
    # is a matter of what a few seconds of training happened to learn: not asserted.)
    start = parameters(pretrained)
    moved = {
        name: distance(parameters(workspace / f"models/{name}/weights/last.pt"), start) for name in starts
    }
    assert moved["from-pt-0"] < 0.1 * moved["scratch-0"], moved


@pytest.mark.integration
def test_two_phase_training_starts_from_the_first_phase_detector(
    workspace: Path, pretrained: Path, uninterrupted: Path, train_seed: int
) -> None:
    """`--init` (train_two_phase in dvc.yaml) fine-tunes another detector, here one trained from
    another seed, rather than building train.model from scratch."""
    first = workspace / "models/pretrain/weights/best.pt"
    params = train_params(workspace, "params-two-phase.yaml", epochs=2)
    train(workspace, "then-real-0", "--params", params.name, "--init", str(first), seed=train_seed)
    out = workspace / "models/then-real-0"
    start = parameters(first)
    moved = distance(parameters(out / "weights/last.pt"), start)
    assert moved < 0.1 * distance(parameters(uninterrupted / "weights/last.pt"), start)


def test_a_missing_first_phase_detector_is_named(workspace: Path) -> None:
    missing = "models/composite-0/weights/best.pt"
    done = subprocess.run(
        [*train_command(workspace, "orphan-0"), "--init", missing],
        cwd=workspace,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert f"--init {missing}: no detector weights there" in done.stderr
    assert not (workspace / "models/orphan-0").exists()


@pytest.mark.integration
def test_dvc_retrains_when_pretrained_weights_change(tmp_path: Path, pretrained: Path) -> None:
    tiny = {
        "variants": ["real"],
        "init_from": [],
        "seeds": [0],
        "epochs": 1,
        "imgsz": 64,
        "batch": 4,
        "nbs": 4,
        "workers": 0,
    }
    repo = project_repo(tmp_path, {"train": tiny | {"model": "models/pretrained/start.pt"}})
    repo_run(repo, "dvc", "pull", "-q", "data/seeds/neon-trees.dvc")
    start = repo / "models/pretrained/start.pt"
    shutil.copy(pretrained, start)
    repo_run(repo, "dvc", "add", "-q", "models/pretrained/start.pt")
    commit(repo, "pretrained weights")
    assert "Running stage 'train@real-0'" in repo_run(repo, "dvc", "repro", "train@real-0")
    assert "up to date" in repo_run(repo, "dvc", "status", "train@real-0")
    before = weights(repo / "models/detectors/real-0/weights/best.pt")

    # Other weights under the same name (the file may be a link into DVC's cache: never write
    # through it).
    checkpoint = torch.load(pretrained, map_location="cpu", weights_only=False)
    with torch.no_grad():
        for parameter in checkpoint["model"].parameters():
            parameter.mul_(0.9)
    start.unlink()
    torch.save(checkpoint, start)
    status = repo_run(repo, "dvc", "status", "train@real-0")
    assert "train@real-0" in status and "changed deps" in status and "models/pretrained" in status, status
    repo_run(repo, "dvc", "add", "-q", "models/pretrained/start.pt")
    assert "Running stage 'train@real-0'" in repo_run(repo, "dvc", "repro", "train@real-0")
    after = weights(repo / "models/detectors/real-0/weights/best.pt")
    assert any(not torch.equal(before[k], after[k]) for k in before), "trained as from the old weights"
    assert "up to date" in repo_run(repo, "dvc", "status", "train@real-0")


def refusal(tmp_path: Path, model: str, cwd: Path) -> str:
    """What `genfusion train` says, run in `cwd`, when train.model is `model`."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"]["model"] = model
    (tmp_path / "refused.yaml").write_text(yaml.safe_dump(params))
    done = subprocess.run(
        [*train_command(tmp_path), "--params", str(tmp_path / "refused.yaml")],
        cwd=cwd,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2, done.stderr
    return done.stderr


@pytest.mark.parametrize(
    "model",
    [
        "{tmp}/yolov8l.pt",
        "yolov8l.pt",
        "models/yolov8l.pt",
        "models/pretrained/../yolov8l.pt",
        "{tmp}/models/pretrained/yolov8l.pt",
    ],
    ids=["elsewhere", "project-root", "models", "dot-dot", "other-folders-models-pretrained"],
)
def test_weights_outside_models_pretrained_are_refused(tmp_path: Path, model: str) -> None:
    project = tmp_path / "project"
    (project / "models/pretrained").mkdir(parents=True)
    model = model.format(tmp=tmp_path)
    Path(project, model).parent.mkdir(parents=True, exist_ok=True)
    Path(project, model).write_bytes(b"weights")  # there, so that only the place is wrong
    message = refusal(tmp_path, model, cwd=project)
    assert len(message.strip().splitlines()) == 1, message
    assert f"train.model: weights file {model!r} is outside models/pretrained/" in message
    assert "copy it into models/pretrained/, `dvc add models/pretrained/yolov8l.pt`" in message
    assert not (project / "models/real-0").exists() and not (project / "models/.real-0.partial").exists()


def test_weights_inside_models_pretrained_and_configs_pass(tmp_path: Path) -> None:
    (tmp_path / "models/pretrained").mkdir(parents=True)
    # DVC's symlink cache type links an added file into the cache: its folder is what counts.
    (tmp_path / "cache").mkdir()
    (tmp_path / "models/pretrained/linked.pt").symlink_to(tmp_path / "cache/0123")
    for model in (
        "yolov8n.yaml",
        "yolov8n-seg.yaml",
        "models/pretrained/yolov8l.pt",
        "./models/pretrained/team/yolov8l.pt",
        f"{tmp_path}/models/pretrained/yolov8l.pt",
        "models/pretrained/linked.pt",
    ):
        check_pretrained_weights(model, tmp_path)


@pytest.mark.integration
def test_missing_pretrained_weights_are_named(workspace: Path) -> None:
    """A .pt in the right place that is not there: load_yolo's error, nothing downloaded."""
    params = train_params(workspace, "params-missing.yaml", model="models/pretrained/missing.pt")
    done = subprocess.run(
        [*train_command(workspace, "missing-0"), "--params", params.name],
        cwd=workspace,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "train.model: weights file 'models/pretrained/missing.pt' not found" in done.stderr


def test_new_pretrained_weights_under_the_same_name_are_a_new_run(workspace: Path, tmp_path: Path) -> None:
    """An interrupted run resumes only the same request: replaced weights train anew, not on from
    the run that started from the old ones."""
    data_yaml = workspace / "data/datasets/real/dataset.yaml"
    weights = tmp_path / "models/pretrained/start.pt"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"old weights")
    args = {"epochs": 2, "seed": 0}
    first = request_fingerprint(data_yaml, str(weights), args)
    assert request_fingerprint(data_yaml, str(weights), args) == first
    weights.write_bytes(b"new weights")
    assert request_fingerprint(data_yaml, str(weights), args) != first
    assert request_fingerprint(data_yaml, "yolov8n.yaml", args) == request_fingerprint(
        data_yaml, "yolov8n.yaml", args
    )


def test_training_validation_and_prediction_compute_on_the_threads_set_before(
    workspace: Path, tmp_path: Path
) -> None:
    """Ultralytics sets torch to the machine's cores less one when it selects a CPU (one thread of
    two); a model from load_yolo computes on the count set before it was loaded (params `threads`,
    which the command line applies)."""
    from genfusion.integrations.ultralytics import load_yolo

    wanted = os.cpu_count() + 1  # never the cores less one
    torch.set_num_threads(wanted)
    model = load_yolo("yolov8n.yaml")
    events = ("on_train_batch_start", "on_val_batch_start", "on_predict_batch_start")
    seen: dict[str, int] = {}
    for event in events:
        model.add_callback(event, lambda _, event=event: seen.setdefault(event, torch.get_num_threads()))
    data = workspace / "data/datasets/real/dataset.yaml"
    model.train(data=str(data), epochs=1, imgsz=32, batch=4, workers=0, device="cpu",
                project=str(tmp_path), name="run", plots=False, verbose=False)  # fmt: skip
    model.predict(np.zeros((64, 64, 3), dtype=np.uint8), imgsz=32, device="cpu", verbose=False)
    assert seen == dict.fromkeys(events, wanted)
