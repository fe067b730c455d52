"""`train@variant-seed` stage: one Ultralytics YOLO detector per dataset variant and seed.

Training runs in a scratch folder beside the output and is renamed into place only
when it has finished, so an interrupted run leaves no half-written model. Running the
stage again with the same request resumes from the scratch folder's last epoch, and goes on
exactly as the interrupted run would have (`ExactResume`).
Training curves go to dvclive (our one logging path; Ultralytics' own integrations
are switched off in `genfusion.integrations.ultralytics`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import pickle
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from genfusion import fsio, layout
from genfusion.integrations.ultralytics import load_yolo, restore_training_state, settle_run, training_state
from genfusion.params import Params, TrainParams

log = logging.getLogger(__name__)

# TrainParams fields that are not Ultralytics train() arguments.
NOT_YOLO_ARGS = ("variants", "seeds", "model", "same_steps", "init_from")


def variant_epochs(params: TrainParams, counts: dict) -> int:
    """`train.epochs`, or with `same_steps` as many epochs as make `epochs` real-split passes."""
    if not params.same_steps:
        return params.epochs
    return max(1, round(params.epochs * counts["real_train_split"] / counts["train_images"]))


def train_args(params: TrainParams, seed: int, counts: dict) -> dict:
    """Ultralytics train() arguments: every other train.* param, plus the seed."""
    args = params.model_dump(exclude=set(NOT_YOLO_ARGS))
    return args | {"seed": seed, "epochs": variant_epochs(params, counts)}


def request_fingerprint(data_yaml: Path, model: str, args: dict) -> str:
    """What makes two training runs the same run, for deciding whether to resume: the data, the
    settings and the starting model (pretrained weights by content: new weights under the same
    name start a new run)."""
    labels = hashlib.sha256()
    for label in sorted(layout.labels_dir(data_yaml.parent, "train").glob("*.txt")):
        labels.update(label.name.encode() + b"\0" + label.read_bytes() + b"\0")
    start = {"model": model}
    if model.endswith(".pt") and Path(model).is_file():
        with open(model, "rb") as weights:
            start["weights"] = hashlib.file_digest(weights, "sha256").hexdigest()
    blob = json.dumps(
        {"data": data_yaml.read_text(), "labels": labels.hexdigest(), **start, "args": args},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def checkpoint_epoch(path: Path) -> int | None:
    """The epoch a checkpoint was saved at; None for a missing checkpoint, or one cut short by a
    kill while it was written."""
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        if path.exists():
            log.warning("train: cannot resume from %s (%s); starting over", path, exc)
        return None
    return checkpoint["epoch"]


class ExactResume:
    """Ultralytics callbacks that make a resumed run go on exactly as the interrupted one would
    have: every epoch saves a `training_state` in `folder`, and a resumed run puts back the one of
    its checkpoint's epoch. Ultralytics' own resume would train on from rounded EMA weights,
    with a new data order and new augmentations."""

    def __init__(self, folder: Path, resume_epoch: int | None) -> None:
        self.folder = folder
        folder.mkdir(exist_ok=True)
        self.saved = None if resume_epoch is None else self.load(resume_epoch)
        # on_val_end is given the validator only: the trainer is kept from the epoch's end.
        self.trainer = None

    def path(self, epoch: int) -> Path:
        return self.folder / f"epoch-{epoch}.pt"

    def load(self, epoch: int) -> dict | None:
        import torch

        path = self.path(epoch)
        if not path.exists():
            log.warning(
                "train: no saved training state for epoch %d in %s: resuming from last.pt alone, so"
                " the resumed epochs will differ from an uninterrupted run's",
                epoch + 1,
                self.folder,
            )
            return None
        return torch.load(path, map_location="cpu", weights_only=False)

    def attach(self, model) -> None:
        model.add_callback("on_train_epoch_end", self.on_train_epoch_end)
        model.add_callback("on_val_end", self.on_val_end)
        model.add_callback("on_model_save", self.on_model_save)
        if self.saved is not None:
            model.add_callback("on_train_epoch_start", self.on_train_epoch_start)

    def on_train_epoch_start(self, trainer) -> None:
        if self.saved is not None:
            restore_training_state(trainer, self.saved)
            self.saved = None

    def on_train_epoch_end(self, trainer) -> None:
        self.trainer = trainer

    def on_val_end(self, validator) -> None:
        import torch

        # Ultralytics also calls this for the final validation of best.pt, which is no epoch's.
        if not validator.training:
            return
        # Saved after the epoch's validation, which draws from `random`, and before last.pt, so
        # that whichever epoch a kill leaves in last.pt has its state here.
        buffer = io.BytesIO()
        torch.save(training_state(self.trainer), buffer)
        fsio.write_bytes(self.path(self.trainer.epoch), buffer.getvalue())

    def on_model_save(self, trainer) -> None:
        # last.pt has moved on to this epoch, whose state is saved: the previous one is spent.
        self.path(trainer.epoch - 1).unlink(missing_ok=True)


class DvcLiveLogger:
    """Ultralytics callbacks that log each training epoch's losses and val metrics to dvclive."""

    def __init__(self, live_dir: Path) -> None:
        from dvclive import Live

        # A resumed run rebuilds the curves (`catch_up`): a kill can leave dvclive's files
        # half-written (its summary truncated to nothing), which dvclive cannot resume from.
        shutil.rmtree(live_dir, ignore_errors=True)
        # Live() opens the DVC repo (about a second): let it do so while the first epoch trains.
        self._live = ThreadPoolExecutor(max_workers=1).submit(
            Live, str(live_dir), dvcyaml=None, save_dvc_exp=False, report=None
        )
        self.in_training_epoch = False

    @property
    def live(self):
        return self._live.result()

    def attach(self, model) -> None:
        model.add_callback("on_train_epoch_end", self.on_train_epoch_end)
        model.add_callback("on_fit_epoch_end", self.on_fit_epoch_end)

    def on_train_epoch_end(self, trainer) -> None:
        self.in_training_epoch = True

    def catch_up(self, results_csv: Path, last_epoch: int) -> None:
        """Log the epochs up to the checkpoint's from Ultralytics' results.csv, which has each of
        them whole: it is written before the checkpoint, and a kill can land anywhere in
        dvclive's own writes. Values are results.csv's (6 significant digits)."""
        live = self.live
        with results_csv.open(newline="") as f:
            rows = list(csv.DictReader(f, skipinitialspace=True))
        # An epoch trained again after an earlier kill has a later row: the one its checkpoint kept.
        epochs = {int(float(row.pop("epoch"))) - 1: row for row in rows}
        for step in sorted(s for s in epochs if s <= last_epoch):
            epochs[step].pop("time", None)
            live.step = step
            for name, value in epochs[step].items():
                live.log_metric(name, float(value))
            live.next_step()

    def on_fit_epoch_end(self, trainer) -> None:
        # Ultralytics also calls this after the final validation, which is no epoch.
        if not self.in_training_epoch:
            return
        self.in_training_epoch = False
        # Step = epoch, so a resumed run continues the curves where the checkpoint was.
        self.live.step = trainer.epoch
        metrics = trainer.label_loss_items(trainer.tloss, prefix="train") | trainer.metrics | trainer.lr
        for name, value in metrics.items():
            self.live.log_metric(name, float(value))
        self.live.next_step()


def train_detector(
    data_yaml: Path, out: Path, live_out: Path, params: TrainParams, seed: int, init: Path | None = None
) -> Path:
    """Train and return the path of the best weights inside `out`; from the weights `init` (another
    detector's, for a two-phase row) instead of `train.model` when given."""
    args = train_args(params, seed, json.loads((data_yaml.parent / "counts.json").read_text()))
    scratch = out.with_name(f".{out.name}.partial").resolve()
    start = params.model if init is None else str(init)
    fingerprint = request_fingerprint(data_yaml, start, args)
    request_file = scratch / "request.sha256"
    last = scratch / "weights" / "last.pt"
    same_request = request_file.exists() and request_file.read_text() == fingerprint
    last_epoch = checkpoint_epoch(last) if same_request else None
    # Ultralytics resumes only an unfinished run: a checkpoint of the last epoch, or one stripped
    # at the end (epoch -1), is a run killed in its final steps, which Ultralytics would fail on or
    # train anew from the finished weights.
    resume = last_epoch is not None and 0 <= last_epoch < args["epochs"] - 1
    if last_epoch is not None and not resume:
        log.warning("train: the run in %s was killed after its last epoch; training again", scratch)
    if resume:
        log.info("train: resuming the interrupted run in %s", scratch)
    else:
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        request_file.write_text(fingerprint)

    logger = DvcLiveLogger(scratch / "live")
    if resume:
        logger.catch_up(scratch / "results.csv", last_epoch)
    exact_resume = ExactResume(scratch / "resume-state", last_epoch)
    model = load_yolo(last if resume else start)
    logger.attach(model)
    exact_resume.attach(model)
    data = str(data_yaml.resolve())
    if resume:
        model.train(resume=True, data=data, workers=params.workers, device=params.device)
    else:
        model.train(
            data=data,
            project=str(scratch.parent),
            name=scratch.name,
            exist_ok=True,
            plots=False,
            verbose=False,
            **args,
        )
    logger.live.end()
    shutil.rmtree(exact_resume.folder)
    settle_run(scratch, layout.project_root())

    for stale in (out, live_out):
        shutil.rmtree(stale, ignore_errors=True)
    live_out.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(scratch / "live", live_out)
    os.replace(scratch, out)
    best = out / "weights" / "best.pt"
    log.info("train: %s done, weights in %s", out.name, best)
    return best


def main(params: Params, *, data: Path, seed: int, out: Path, live: Path, init: Path | None = None) -> None:
    train_detector(data / layout.DATASET_YAML, out, live, params.train, seed, init)
