"""`train@variant-seed` stage: one Ultralytics YOLO detector per dataset variant and seed.

Training runs in a scratch folder beside the output and is renamed into place only
when it has finished, so an interrupted run leaves no half-written model. Running the
stage again with the same request resumes from the scratch folder's last epoch.
Training curves go to dvclive (our one logging path; Ultralytics' own integrations
are switched off in `genfusion.yolo`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from genfusion.params import TrainParams
from genfusion.yolo import load_yolo

log = logging.getLogger(__name__)

# TrainParams fields that are not Ultralytics train() arguments.
NOT_YOLO_ARGS = ("variants", "seeds", "model")


def train_args(params: TrainParams, seed: int) -> dict:
    """Ultralytics train() arguments: every other train.* param, plus the seed."""
    return {k: v for k, v in params.model_dump().items() if k not in NOT_YOLO_ARGS} | {"seed": seed}


def request_fingerprint(data_yaml: Path, model: str, args: dict) -> str:
    """What makes two training runs the same run, for deciding whether to resume."""
    blob = json.dumps({"data": data_yaml.read_text(), "model": model, "args": args}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def dvclive_callback(live_dir: Path, resume: bool):
    from dvclive import Live

    live = Live(str(live_dir), resume=resume, dvcyaml=None, save_dvc_exp=False, report=None)

    def on_fit_epoch_end(trainer) -> None:
        metrics = trainer.label_loss_items(trainer.tloss, prefix="train") | trainer.metrics | trainer.lr
        for name, value in metrics.items():
            live.log_metric(name, float(value))
        live.next_step()

    return live, on_fit_epoch_end


def train_detector(data_yaml: Path, out: Path, live_out: Path, params: TrainParams, seed: int) -> Path:
    """Train and return the path of the best weights inside `out`."""
    args = train_args(params, seed)
    scratch = out.with_name(f".{out.name}.partial").resolve()
    fingerprint = request_fingerprint(data_yaml, params.model, args)
    request_file = scratch / "request.sha256"
    last = scratch / "weights" / "last.pt"
    resume = last.exists() and request_file.exists() and request_file.read_text() == fingerprint
    if resume:
        log.info("train: resuming the interrupted run in %s", scratch)
    else:
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        request_file.write_text(fingerprint)

    live, callback = dvclive_callback(scratch / "live", resume)
    model = load_yolo(last if resume else params.model)
    model.add_callback("on_fit_epoch_end", callback)
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
    live.end()

    for stale in (out, live_out):
        shutil.rmtree(stale, ignore_errors=True)
    live_out.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(scratch / "live", live_out)
    os.replace(scratch, out)
    best = out / "weights" / "best.pt"
    log.info("train: %s done, weights in %s", out.name, best)
    return best


def main(data_yaml: Path, out: Path, live_out: Path, params_path: Path, seed: int) -> None:
    from genfusion.params import load_params

    params = load_params(params_path)
    train_detector(data_yaml, out, live_out, params.train, seed)
